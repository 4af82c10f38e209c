"""Supervised fine-tuning of a pretrained character-level language model on instructions whose
answers are several tokens long; deployed by greedy generation.

Pretraining. A :class:`~beyondloss.tasks.sequences.DecoderTransformer` learns the generated
corpus of :func:`beyondloss.tasks.text.corpus` (sentences over a generated lexicon and
plain-text statements of the instructions' answers on short arguments) by next-token
prediction on every token: a line ``c_0 … c_{m-1}`` followed by ``EOS = c_m`` contributes
:math:`-\\sum_{t=1}^{m} \\log p_\\theta(c_t \\mid c_{<t})`, averaged over the batch's tokens.
The recipe is fixed (:func:`pretrain`): initialisation and batch order seeded by the data seed,
AdamW (β = (0.9, 0.99), weight decay 0.01), ``pretrain_steps`` steps of ``pretrain_batch_size``
lines drawn uniformly with replacement, a learning rate ``pretrain_lr`` for the first 5 % of
the steps ramping up linearly, then a cosine decay to zero, gradients clipped to norm 1. It runs
once per process and configuration (:func:`pretrained_model`), under ``torch.random.fork_rng``,
so the global RNG is untouched; :meth:`FinetuningTask.make_model` returns a copy of the result,
and every optimizer and seed fine-tunes from the same weights (seeds vary the data order).

Fine-tuning. An instance is an instruction of :data:`beyondloss.tasks.text.INSTRUCTIONS` (uniform)
and an argument of ``n`` symbols (``n`` uniform in ``[min_length, max_length]``): the sequence
``verb argument SEP answer EOS``, e.g. ``sort dbca\\n`` then ``abcd EOS``. The loss is the
next-token cross-entropy over the answer tokens and ``EOS`` only,

.. math::

    L = -\\frac{1}{\\sum_b (n_b + 1)} \\sum_b \\sum_{k=0}^{n_b}
        \\log p_\\theta\\big(y_{b,k} \\mid \\text{prompt}_b,\\ y_{b,<k}\\big),

as in :mod:`beyondloss.tasks.sequences` (the prompt is not predicted). The validation loss is
this loss on the validation instances.

Data. Train, val, test and the corpus come from four independent random streams spawned from
the seed. Val and test hold ``n_eval_per_length`` instances of every (instruction, length);
training instances and corpus statements whose (instruction, argument) is a val or test one are
dropped, so evaluation never scores an instance seen in either training phase.

Deployment. :meth:`FinetuningTask.evaluate` decodes greedily from the prompt for ``n + 1``
steps (a decode stops at its first ``EOS``) and scores the tokens against ``answer EOS``
position by position (:mod:`beyondloss.metrics.sequence`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from beyondloss.metrics.sequence import pooled_mean
from beyondloss.tasks.base import ConfiguredTask, Splits, require_positive
from beyondloss.tasks.sequences import (
    IGNORE_INDEX,
    DecoderTransformer,
    Instances,
    next_token_loss,
    score_group,
    teacher_forced,
)
from beyondloss.tasks.text import (
    INSTRUCTIONS,
    VOCABULARY,
    corpus,
    encode,
    lexicon,
    random_strings,
)

WARMUP_FRACTION = 0.05
"""Share of the pretraining steps over which the learning rate ramps up linearly."""


@dataclass(frozen=True)
class FinetuningConfig:
    """Data, pretraining, model and fine-tuning budget of :class:`FinetuningTask`.

    Attributes
    ----------
    seed:
        Seeds the data and the pretraining (initialisation and batch order).
    n_letters:
        Letters of the arguments, words and sentences: the first ``n_letters`` of the alphabet.
    min_length, max_length:
        Range of fine-tuning argument (= answer) lengths ``n``, inclusive.
    n_train:
        Fine-tuning instances drawn (those matching a val or test instance are dropped).
    n_eval_per_length:
        Val and test instances of every (instruction, length).
    n_words, max_word_length:
        Lexicon size and longest word (also the longest digit string of the corpus).
    n_corpus:
        Corpus lines drawn (statements about val or test arguments are dropped).
    pretrain_steps, pretrain_batch_size, pretrain_lr:
        Pretraining budget and peak learning rate (module docs).
    n_layer, n_head, n_embd:
        Transformer depth, attention heads and width (``n_embd`` divisible by ``n_head``).
    epochs, batch_size:
        Fine-tuning budget: passes over the training instances, and instances per step.
    pretrained:
        Fine-tune the pretrained model (``True``) or a freshly initialised one (the ablation).
    """

    seed: int = 0
    n_letters: int = 12
    min_length: int = 3
    max_length: int = 7
    n_train: int = 3600
    n_eval_per_length: int = 32
    n_words: int = 400
    max_word_length: int = 5
    n_corpus: int = 40000
    pretrain_steps: int = 800
    pretrain_batch_size: int = 64
    pretrain_lr: float = 3e-3
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 48
    epochs: int = 6
    batch_size: int = 64
    pretrained: bool = True

    def __post_init__(self) -> None:
        require_positive(
            self,
            (
                "n_train",
                "n_eval_per_length",
                "n_words",
                "n_corpus",
                "pretrain_steps",
                "pretrain_batch_size",
                "n_layer",
                "n_head",
                "n_embd",
                "epochs",
                "batch_size",
            ),
        )
        if not 2 <= self.n_letters <= 26:
            raise ValueError(f"n_letters must be in 2..26, got {self.n_letters}")
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(
                f"need 2 <= min_length <= max_length, got {self.min_length}, {self.max_length}"
            )
        if self.max_word_length < 2:
            raise ValueError(f"max_word_length must be at least 2, got {self.max_word_length}")
        possible = sum(self.n_letters**n for n in range(2, self.max_word_length + 1))
        if self.n_words > possible:
            raise ValueError(
                f"n_words {self.n_words} exceeds the {possible} words of 2..{self.max_word_length}"
                f" letters"
            )
        if not (math.isfinite(self.pretrain_lr) and self.pretrain_lr > 0):
            raise ValueError(f"pretrain_lr must be finite and > 0, got {self.pretrain_lr}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")

    @property
    def lengths(self) -> tuple[int, ...]:
        """The argument lengths ``min_length .. max_length``."""
        return tuple(range(self.min_length, self.max_length + 1))

    @property
    def block_size(self) -> int:
        """Longest model input: an instruction's ``verb argument SEP answer`` at ``max_length``,
        or a corpus line (four longest words, or the longest statement)."""
        word = self.max_word_length
        verb = max(len(instruction.verb) for instruction in INSTRUCTIONS.values())
        return max(verb + 2 + 2 * self.max_length, 4 * word + 4, verb + 2 * word + 6)

    @classmethod
    def quick(cls, seed: int = 0) -> FinetuningConfig:
        """Study-sized: 12 letters, lengths 3–7, 3600 fine-tuning instances (6 epochs of 56
        batches of 64), 32 instances per (instruction, length) and split; a 2-layer width-48
        model (62k parameters) pretrained for 800 steps on 40k lines with words of up to 5
        letters."""
        return cls(seed=seed)

    @classmethod
    def full(cls, seed: int = 0) -> FinetuningConfig:
        """Larger: lengths 3–10, 6000 fine-tuning instances (5 epochs of 93 batches of 64),
        64 instances per (instruction, length) and split; a 3-layer width-64 model (157k
        parameters) pretrained for 1200 steps on 96k lines with words of up to 6 letters."""
        return cls(
            seed=seed,
            max_length=10,
            n_train=6000,
            n_eval_per_length=64,
            n_words=800,
            max_word_length=6,
            n_corpus=96000,
            pretrain_steps=1200,
            n_layer=3,
            n_embd=64,
            epochs=5,
        )


Key = tuple[str, int]
"""An instance group: (instruction name, argument length)."""

STREAMS = ("train", "val", "test", "corpus")
"""The independent random streams of the data, spawned from the seed in this order."""


def _rng(config: FinetuningConfig, stream: str) -> np.random.Generator:
    """The generator of one of :data:`STREAMS`."""
    spawned = np.random.SeedSequence(config.seed).spawn(len(STREAMS))
    return np.random.default_rng(spawned[STREAMS.index(stream)])


def _instances(name: str, arguments: list[str]) -> Instances:
    """``prompt`` and ``answer EOS`` token ids of ``name`` applied to ``arguments`` (at least
    one, all of one length ``n``): ``(m, n + 2 + len(verb))`` and ``(m, n + 1)`` int64."""
    instruction = INSTRUCTIONS[name]
    context = [encode(instruction.prompt(argument)) for argument in arguments]
    target = [encode(instruction.solve(argument)) + [VOCABULARY.eos] for argument in arguments]
    return Instances(
        context=torch.tensor(context, dtype=torch.int64),
        target=torch.tensor(target, dtype=torch.int64),
    )


def _eval_arguments(config: FinetuningConfig) -> dict[str, dict[Key, list[str]]]:
    """Split ("val", "test") → (instruction, length) → ``n_eval_per_length`` arguments."""
    arguments: dict[str, dict[Key, list[str]]] = {}
    for split in ("val", "test"):
        rng = _rng(config, split)
        arguments[split] = {
            (name, n): random_strings(
                rng, config.n_eval_per_length, n, config.n_letters, instruction.letters
            )
            for name, instruction in INSTRUCTIONS.items()
            for n in config.lengths
        }
    return arguments


def _held_out(config: FinetuningConfig) -> set[tuple[str, str]]:
    """The (instruction, argument) pairs of the val and test splits."""
    return {
        (name, argument)
        for groups in _eval_arguments(config).values()
        for (name, _), arguments in groups.items()
        for argument in arguments
    }


def _train_arguments(config: FinetuningConfig) -> dict[Key, list[str]]:
    """(instruction, length) → training arguments, val and test ones dropped."""
    rng = _rng(config, "train")
    names = list(INSTRUCTIONS)
    drawn_names = rng.integers(0, len(names), config.n_train)
    drawn_lengths = rng.integers(config.min_length, config.max_length + 1, config.n_train)
    held_out = _held_out(config)
    groups = {}
    for i, name in enumerate(names):
        for n in config.lengths:
            count = int(((drawn_names == i) & (drawn_lengths == n)).sum())
            drawn = random_strings(rng, count, n, config.n_letters, INSTRUCTIONS[name].letters)
            groups[name, n] = [x for x in drawn if (name, x) not in held_out]
    return groups


def corpus_lines(config: FinetuningConfig) -> list[str]:
    """The pretraining corpus of ``config`` (:func:`beyondloss.tasks.text.corpus`), statements
    about val and test arguments dropped."""
    rng = _rng(config, "corpus")
    words = lexicon(rng, config.n_words, config.max_word_length, config.n_letters)
    return corpus(rng, config.n_corpus, words, config.n_letters, _held_out(config))


def language_modelling(lines: list[str]) -> TensorDataset:
    """Next-token pairs of every line followed by ``EOS``, right-padded to the longest: inputs
    ``(N, W)`` are the line's tokens then ``PAD``; targets ``(N, W)`` the next token (the last
    one ``EOS``) where there is one, else :data:`IGNORE_INDEX`."""
    encoded = [encode(line) + [VOCABULARY.eos] for line in lines]
    width = max(len(tokens) for tokens in encoded) - 1
    inputs = torch.full((len(lines), width), VOCABULARY.pad, dtype=torch.int64)
    targets = torch.full((len(lines), width), IGNORE_INDEX, dtype=torch.int64)
    for row, tokens in enumerate(encoded):
        inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        targets[row, : len(tokens) - 1] = torch.tensor(tokens[1:])
    return TensorDataset(inputs, targets)


def new_model(config: FinetuningConfig) -> DecoderTransformer:
    """A freshly initialised :class:`DecoderTransformer` of ``config``'s size; global torch
    RNG."""
    return DecoderTransformer(
        VOCABULARY.size, config.block_size, config.n_layer, config.n_head, config.n_embd
    )


def pretrain(config: FinetuningConfig) -> DecoderTransformer:
    """Pretrain a new model on ``config``'s corpus by the fixed recipe of the module docs; not
    cached. Runs under ``torch.random.fork_rng``: the global RNG is left as it was."""
    inputs, targets = language_modelling(corpus_lines(config)).tensors
    steps = config.pretrain_steps
    warmup = max(1, round(WARMUP_FRACTION * steps))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = new_model(config)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.99), weight_decay=0.01
        )
        order = torch.Generator().manual_seed(config.seed)
        for step in range(steps):
            ramp = min(1.0, (step + 1) / warmup)
            cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = config.pretrain_lr * min(ramp, cosine)
            rows = torch.randint(len(inputs), (config.pretrain_batch_size,), generator=order)
            loss = next_token_loss(model, (inputs[rows], targets[rows]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model


_BUDGET_FIELDS = {"n_train": 1, "epochs": 1, "batch_size": 1, "pretrained": True}
"""Fine-tuning fields that do not change the pretrained model, with the values the cache key
gives them."""

_PRETRAINED: dict[FinetuningConfig, DecoderTransformer] = {}
"""This process's pretrained models, keyed by their config with :data:`_BUDGET_FIELDS` fixed."""


def pretrained_model(config: FinetuningConfig) -> DecoderTransformer:
    """The pretrained model of ``config`` (:func:`pretrain`), computed once per process and then
    cached; configs that differ only in the fine-tuning budget share it. Do not modify it:
    copy it (:meth:`FinetuningTask.make_model` does)."""
    key = replace(config, **_BUDGET_FIELDS)
    if key not in _PRETRAINED:
        _PRETRAINED[key] = pretrain(key)
    return _PRETRAINED[key]


@dataclass(frozen=True)
class _FinetuningData:
    splits: Splits
    eval_instances: dict[str, dict[Key, Instances]]  # split → (instruction, length) → instances


def _build(config: FinetuningConfig) -> _FinetuningData:
    eval_instances = {
        split: {key: _instances(key[0], arguments) for key, arguments in groups.items()}
        for split, groups in _eval_arguments(config).items()
    }
    train = [_instances(name, xs) for (name, _), xs in _train_arguments(config).items() if xs]
    val, test = (
        teacher_forced(list(groups.values()), VOCABULARY) for groups in eval_instances.values()
    )
    return _FinetuningData(
        splits=Splits(train=teacher_forced(train, VOCABULARY), val=val, test=test),
        eval_instances=eval_instances,
    )


class FinetuningTask(ConfiguredTask):
    """Instruction fine-tuning of a pretrained character-level model (see module docs). Data
    are generated, and the model pretrained, on first use.

    Metrics of :meth:`evaluate`, all fractions in ``[0, 1]`` and higher-is-better, pooled over
    every instruction and length unless named otherwise:

    - ``exact_match``: greedy answers right at every position (``EOS`` included) — primary;
    - ``token_accuracy``: answer tokens and ``EOS`` right under greedy decoding, pooled over
      tokens;
    - ``teacher_forced_accuracy``: the same tokens' argmax predictions right given the true
      prefix (one-step): its gap to ``token_accuracy`` is what feeding back the model's own
      outputs costs;
    - ``exact_match@<instruction>``: exact match of one instruction, every length;
    - ``exact_match@len<n>``: exact match at answer length ``n``, every instruction.
    """

    build_data = staticmethod(_build)

    primary_metric = "exact_match"

    def __init__(self, config: FinetuningConfig | None = None) -> None:
        self.config = FinetuningConfig.quick() if config is None else config
        self.name = "sft" if self.config.pretrained else "sft-scratch"
        names = ["exact_match", "token_accuracy", "teacher_forced_accuracy"]
        names += [f"exact_match@{name}" for name in INSTRUCTIONS]
        names += [f"exact_match@len{n}" for n in self.config.lengths]
        self.higher_is_better: Mapping[str, bool] = MappingProxyType(dict.fromkeys(names, True))

    def eval_instances(self, split: str) -> dict[Key, Instances]:
        """(instruction, length) → evaluation instances of ``split`` ("val" or "test"),
        ``n_eval_per_length`` each."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return self._data().eval_instances[split]

    def splits(self) -> Splits:
        """Teacher-forcing pairs ``(inputs, targets)`` per split (see
        :func:`~beyondloss.tasks.sequences.teacher_forced`): train about ``n_train``
        instances, val and test those of :meth:`eval_instances`."""
        return self._data().splits

    def make_model(self) -> nn.Module:
        """A copy of the pretrained model (:func:`pretrained_model`; no global RNG use), or with
        ``pretrained=False`` a freshly initialised one (global torch RNG)."""
        if not self.config.pretrained:
            return new_model(self.config)
        return copy.deepcopy(pretrained_model(self.config))

    def loss(self, model: nn.Module, batch: object) -> torch.Tensor:
        """Teacher-forced cross-entropy over the batch's answer tokens and ``EOS`` (module docs);
        ``batch = (inputs, targets)``, each ``(B, W)``; returns a scalar."""
        return next_token_loss(model, batch)

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        """Greedy-generation metrics of ``model`` on ``split`` ("val" or "test"); see the class
        docs. With ``primary_only`` the teacher-forced pass is skipped (no
        ``teacher_forced_accuracy``). Instructions whose prompts have the same width are decoded
        as one batch.
        Runs in eval mode under ``torch.no_grad``; the training mode is restored afterwards."""
        groups = self.eval_instances(split)
        batches: dict[tuple[int, int], list[Key]] = {}  # (prompt width, length) → groups
        for key, group in groups.items():
            batches.setdefault((group.context.shape[1], key[1]), []).append(key)
        exact: dict[Key, torch.Tensor] = {}
        tokens: dict[Key, torch.Tensor] = {}
        forced: dict[tuple[int, int], torch.Tensor] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for shape, keys in batches.items():
                    sizes = [groups[key].context.shape[0] for key in keys]
                    joined = Instances(
                        context=torch.cat([groups[key].context for key in keys]),
                        target=torch.cat([groups[key].target for key in keys]),
                    )
                    scores = score_group(model, joined, VOCABULARY, not primary_only)
                    for key, e, t in zip(
                        keys, scores.exact.split(sizes), scores.tokens.split(sizes), strict=True
                    ):
                        exact[key], tokens[key] = e, t
                    if scores.forced is not None:
                        forced[shape] = scores.forced
        finally:
            model.train(was_training)
        metrics = {"exact_match": pooled_mean(exact), "token_accuracy": pooled_mean(tokens)}
        if forced:
            metrics["teacher_forced_accuracy"] = pooled_mean(forced)
        for name in INSTRUCTIONS:
            metrics[f"exact_match@{name}"] = pooled_mean(
                {key: value for key, value in exact.items() if key[0] == name}
            )
        for n in self.config.lengths:
            metrics[f"exact_match@len{n}"] = pooled_mean(
                {key: value for key, value in exact.items() if key[1] == n}
            )
        return metrics


def make_finetuning_task(size: str, data_seed: int) -> FinetuningTask:
    """:class:`FinetuningTask` at :meth:`FinetuningConfig.quick` (``size="quick"``) or
    :meth:`FinetuningConfig.full` (``size="full"``), data and pretraining seeded by
    ``data_seed``."""
    if size not in ("quick", "full"):
        raise ValueError(f"unknown task size {size!r}; expected 'quick' or 'full'")
    make_config = FinetuningConfig.quick if size == "quick" else FinetuningConfig.full
    return FinetuningTask(make_config(data_seed))
