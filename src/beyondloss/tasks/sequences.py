"""Autoregressive generation of algorithmic sequences: teacher-forced training, greedy deployment.

Problems (:data:`PROBLEMS`). An instance of length ``n`` has a prompt of ``n`` symbols drawn
i.i.d. uniformly from ``0 .. S-1`` (``S = n_symbols``, repeats allowed) and an answer of ``n``
symbols:

* ``"sort"``: the prompt in non-decreasing order. Each answer token is the smallest prompt
  symbol not yet emitted, counting repeats, so a greedy decoder must read its own earlier outputs
  to know where it is: one skipped or doubled symbol shifts every later token. Errors compound.
* ``"reverse"``: the prompt backwards. Answer token ``k`` is prompt token ``n-1-k`` whatever
  came before, so a mistake does not propagate: the control in which greedy and teacher-forced
  token accuracies coincide.

Tokens (:class:`Vocabulary`): the ``S`` symbols, then ``SEP``, ``EOS`` and ``PAD``. A sequence
is ``prompt SEP answer EOS`` (``2n + 2`` tokens).

Data. Training lengths are uniform in ``[min_length, max_length]``; the validation and test
splits hold ``n_eval_per_length`` instances of every training length (in distribution) and of
every length in ``ood_lengths`` (longer than trained on: their later positions have position
embeddings that training never used). Train, val and test come from three independent random
streams spawned from the seed; training instances whose prompt is also a val or test prompt are
dropped, so evaluation never scores a memorised instance.

Model and loss. A decoder-only transformer (:class:`DecoderTransformer`, nanoGPT's layout with
separate query/key/value/output projections and an untied head) is trained with teacher forcing:
the input is the sequence without its last token, and the loss is the next-token cross-entropy
averaged over the answer tokens and ``EOS`` of every sequence in the batch,

.. math::

    L = -\\frac{1}{\\sum_b (n_b + 1)} \\sum_b \\sum_{k=0}^{n_b}
        \\log p_\\theta\\big(y_{b,k} \\mid \\text{prompt}_b,\\ \\mathrm{SEP},\\ y_{b,<k}\\big),

with ``y_{b,n_b} = EOS``; prompt tokens and padding are not predicted. The validation loss is
this loss on the in-distribution validation instances.

Deployment. :meth:`SequenceTask.evaluate` decodes greedily from ``prompt SEP`` for ``n + 1``
steps (a decode stops at its first ``EOS``) and scores the ``n + 1`` tokens against
``answer EOS`` position by position (:mod:`beyondloss.metrics.sequence`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.metrics.sequence import exact_match, pooled_mean, token_matches
from beyondloss.tasks.base import ConfiguredTask, Splits, require_positive

PROBLEMS = ("sort", "reverse")
"""Algorithmic problems of :class:`SequenceTask` (see the module docs)."""

IGNORE_INDEX = -100
"""Target of positions that carry no loss (prompt tokens, padding)."""


@dataclass(frozen=True)
class Vocabulary:
    """Token ids: symbols ``0 .. n_symbols - 1``, then ``sep``, ``eos`` and ``pad``."""

    n_symbols: int

    @property
    def sep(self) -> int:
        """Ends the prompt; the answer follows."""
        return self.n_symbols

    @property
    def eos(self) -> int:
        """Ends the answer."""
        return self.n_symbols + 1

    @property
    def pad(self) -> int:
        """Fills training sequences up to a common length (never a target)."""
        return self.n_symbols + 2

    @property
    def size(self) -> int:
        """Number of token ids."""
        return self.n_symbols + 3


@dataclass(frozen=True)
class SequenceConfig:
    """Problem, data, model and budget of :class:`SequenceTask`.

    Attributes
    ----------
    problem:
        One of :data:`PROBLEMS`.
    seed:
        Seeds the data; train, val and test use independent streams from it.
    n_symbols:
        Alphabet size ``S``.
    min_length, max_length:
        Range of training lengths ``n`` (inclusive), drawn uniformly.
    ood_lengths:
        Evaluation lengths beyond ``max_length`` (distinct, increasing); may be empty.
    n_train:
        Training instances drawn (fewer remain if some coincide with val/test prompts: at
        ``S = 10`` about 6 % of the length-3 ones, ``2 n_eval_per_length / S³``).
    n_eval_per_length:
        Val and test instances of each evaluated length.
    n_layer, n_head, n_embd:
        Transformer depth, attention heads and width (``n_embd`` divisible by ``n_head``).
    epochs, batch_size:
        Training budget: passes over the training instances, and instances per step.
    """

    problem: str = "sort"
    seed: int = 0
    n_symbols: int = 10
    min_length: int = 3
    max_length: int = 7
    ood_lengths: tuple[int, ...] = (8, 10)
    n_train: int = 2240
    n_eval_per_length: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 48
    epochs: int = 6
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {PROBLEMS}, got {self.problem!r}")
        require_positive(
            self,
            (
                "min_length",
                "n_train",
                "n_eval_per_length",
                "n_layer",
                "n_head",
                "n_embd",
                "epochs",
                "batch_size",
            ),
        )
        if self.n_symbols < 2:
            raise ValueError(f"n_symbols must be at least 2, got {self.n_symbols}")
        if self.max_length < self.min_length:
            raise ValueError(
                f"max_length must be >= min_length, got {self.max_length} < {self.min_length}"
            )
        ood = tuple(self.ood_lengths)
        if any(b <= a for a, b in zip(ood, ood[1:], strict=False)) or (
            ood and ood[0] <= self.max_length
        ):
            raise ValueError(
                f"ood_lengths must be increasing and above max_length {self.max_length}, got {ood}"
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        object.__setattr__(self, "ood_lengths", ood)

    @property
    def train_lengths(self) -> tuple[int, ...]:
        """The in-distribution lengths ``min_length .. max_length``."""
        return tuple(range(self.min_length, self.max_length + 1))

    @property
    def lengths(self) -> tuple[int, ...]:
        """Every evaluated length: the training lengths, then ``ood_lengths``."""
        return self.train_lengths + self.ood_lengths

    @property
    def vocabulary(self) -> Vocabulary:
        """The token ids of this configuration."""
        return Vocabulary(self.n_symbols)

    @property
    def block_size(self) -> int:
        """Longest model input: ``prompt SEP answer`` at the longest evaluated length."""
        return 2 * self.lengths[-1] + 1

    @classmethod
    def quick(cls, seed: int = 0, problem: str = "sort") -> SequenceConfig:
        """Study-sized (seconds per run on one CPU thread): 10 symbols, lengths 3–7 (ood 8, 10),
        2240 training instances (6 epochs of 35 batches of 64), 32 instances per length and
        split, a 2-layer width-48 model (59k parameters)."""
        return cls(problem=problem, seed=seed)

    @classmethod
    def full(cls, seed: int = 0, problem: str = "sort") -> SequenceConfig:
        """Larger: 16 symbols, lengths 3–10 (ood 12, 14), 12800 training instances (10 epochs
        of 200 batches of 64), 128 instances per length and split, a 3-layer width-96 model
        (342k parameters)."""
        return cls(
            problem=problem,
            seed=seed,
            n_symbols=16,
            max_length=10,
            ood_lengths=(12, 14),
            n_train=12800,
            n_eval_per_length=128,
            n_layer=3,
            n_embd=96,
            epochs=10,
        )


def make_instances(
    problem: str, n: int, count: int, n_symbols: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random instances of length ``n``: prompts and answers, each ``(count, n)``
    int64 symbol ids (see the module docs)."""
    prompts = rng.integers(0, n_symbols, (count, n))
    if problem == "sort":
        return prompts, np.sort(prompts, axis=1)
    if problem == "reverse":
        return prompts, prompts[:, ::-1].copy()
    raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")


@dataclass(frozen=True)
class Instances:
    """Instances of one length ``n`` as token ids: ``context`` is ``prompt SEP`` and ``target``
    is ``answer EOS``, each ``(m, n + 1)`` int64."""

    context: Tensor
    target: Tensor

    @classmethod
    def from_arrays(
        cls, prompts: np.ndarray, answers: np.ndarray, vocabulary: Vocabulary
    ) -> Instances:
        """Append ``SEP`` to ``prompts`` and ``EOS`` to ``answers`` (each ``(m, n)``)."""
        column = np.ones((prompts.shape[0], 1), dtype=np.int64)
        return cls(
            context=torch.from_numpy(np.concatenate([prompts, vocabulary.sep * column], axis=1)),
            target=torch.from_numpy(np.concatenate([answers, vocabulary.eos * column], axis=1)),
        )


def teacher_forced(groups: list[Instances], vocabulary: Vocabulary) -> TensorDataset:
    """Teacher-forcing pairs of every instance in ``groups``, right-padded to the longest.

    Returns a dataset of ``(inputs, targets)``, each ``(N, W)`` int64 with ``W = 2 n_max + 1``:
    ``inputs`` is ``prompt SEP answer`` then ``PAD``; ``targets[:, j]`` is the token that follows
    ``inputs[:, j]`` where that token is an answer token or ``EOS``, else :data:`IGNORE_INDEX`.
    """
    widths = [group.context.shape[1] + group.target.shape[1] - 1 for group in groups]
    width = max(widths)
    inputs, targets = [], []
    for group, used in zip(groups, widths, strict=True):
        m, context = group.context.shape
        padded = torch.full((m, width), vocabulary.pad, dtype=torch.int64)
        padded[:, :used] = torch.cat([group.context, group.target[:, :-1]], dim=1)
        target = torch.full((m, width), IGNORE_INDEX, dtype=torch.int64)
        target[:, context - 1 : used] = group.target
        inputs.append(padded)
        targets.append(target)
    return TensorDataset(torch.cat(inputs), torch.cat(targets))


@dataclass(frozen=True)
class _SequenceData:
    splits: Splits
    eval_instances: dict[str, dict[int, Instances]]  # split → length → instances


def _build(config: SequenceConfig) -> _SequenceData:
    vocabulary = config.vocabulary
    train_rng, val_rng, test_rng = (
        np.random.default_rng(stream) for stream in np.random.SeedSequence(config.seed).spawn(3)
    )
    eval_instances: dict[str, dict[int, Instances]] = {}
    held_out: set[bytes] = set()
    for split, rng in (("val", val_rng), ("test", test_rng)):
        eval_instances[split] = {}
        for n in config.lengths:
            prompts, answers = make_instances(
                config.problem, n, config.n_eval_per_length, config.n_symbols, rng
            )
            eval_instances[split][n] = Instances.from_arrays(prompts, answers, vocabulary)
            held_out.update(row.tobytes() for row in prompts)
    lengths = train_rng.integers(config.min_length, config.max_length + 1, config.n_train)
    train = []
    for n in config.train_lengths:
        prompts, answers = make_instances(
            config.problem, n, int((lengths == n).sum()), config.n_symbols, train_rng
        )
        fresh = np.array([row.tobytes() not in held_out for row in prompts], dtype=bool)
        train.append(Instances.from_arrays(prompts[fresh], answers[fresh], vocabulary))
    in_distribution = {
        split: teacher_forced([groups[n] for n in config.train_lengths], vocabulary)
        for split, groups in eval_instances.items()
    }
    return _SequenceData(
        splits=Splits(
            train=teacher_forced(train, vocabulary),
            val=in_distribution["val"],
            test=in_distribution["test"],
        ),
        eval_instances=eval_instances,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, ``(B, T, C) → (B, T, C)``, with separate ``nn.Linear``
    query, key, value and output projections (so activation preconditioning sees each)."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_embd, n_embd)
        self.key = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.out = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """Position ``t`` of the output depends only on positions ``≤ t`` of ``x``."""
        batch, time, channels = x.shape

        def heads(projection: nn.Linear) -> Tensor:  # (B, T, C) → (B, H, T, C / H)
            return projection(x).view(batch, time, self.n_head, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.query), heads(self.key), heads(self.value), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(batch, time, channels))


class MLP(nn.Module):
    """Position-wise ``C → 4C → C`` with GELU."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., C) → (..., C)``."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C) → (B, T, C)``, causal."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DecoderTransformer(nn.Module):
    """Decoder-only transformer: token ids ``(B, T)`` → next-token logits ``(B, T, V)``.

    Token plus learned position embeddings, ``n_layer`` pre-LN :class:`Block` s, a final
    LayerNorm and an untied linear head (registered last, so optimizers that treat "the last
    Linear" as the output layer find it). Weights are initialised as in nanoGPT: normal with
    std 0.02, the residual output projections with ``0.02 / sqrt(2 n_layer)``, biases zero.
    ``T`` may not exceed ``block_size``; positions beyond the longest training sequence get no
    gradient from training.
    """

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                residual = name.endswith(("attn.out", "mlp.proj"))
                std = 0.02 / math.sqrt(2 * n_layer) if residual else 0.02
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, T, V)``; those at position ``t`` depend only on ``idx[:, :t + 1]``."""
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size {self.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def greedy_generate(model: nn.Module, context: Tensor, steps: int, eos: int, pad: int) -> Tensor:
    """Greedy decode of ``steps`` tokens after ``context`` ``(B, P)``: ``(B, steps)`` int64.

    Each step recomputes the logits of the whole prefix (no key/value cache) and appends the
    argmax of the last position. A sequence stops at its first ``eos``: later positions read
    ``pad``. The model's mode and grad state are the caller's.
    """
    sequence = context
    for _ in range(steps):
        next_token = model(sequence)[:, -1].argmax(dim=-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    generated = sequence[:, context.shape[1] :]
    is_eos = generated == eos
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return generated.masked_fill(after_eos, pad)


class SequenceTask(ConfiguredTask):
    """Algorithmic sequence generation (see module docs). Data are generated on first use.

    Metrics of :meth:`evaluate`, all fractions in ``[0, 1]`` and higher-is-better; "in
    distribution" pools every training length, "ood" every length of ``ood_lengths``:

    - ``exact_match``: greedy answers right at every position (``EOS`` included), in
      distribution — primary;
    - ``token_accuracy``: answer tokens and ``EOS`` right under greedy decoding, pooled over
      tokens, in distribution;
    - ``teacher_forced_accuracy``: the same tokens' argmax predictions right given the true
      prefix, a one-step metric: its gap to ``token_accuracy`` is what feeding back the model's
      own outputs costs;
    - ``exact_match_ood``, ``token_accuracy_ood``: the greedy metrics at ``ood_lengths`` (absent
      when there are none);
    - ``exact_match@len<n>``: exact match at each evaluated length ``n``.
    """

    build_data = staticmethod(_build)

    primary_metric = "exact_match"

    def __init__(self, config: SequenceConfig | None = None) -> None:
        self.config = SequenceConfig.quick() if config is None else config
        self.name = f"sequences-{self.config.problem}"
        names = ["exact_match", "token_accuracy", "teacher_forced_accuracy"]
        if self.config.ood_lengths:
            names += ["exact_match_ood", "token_accuracy_ood"]
        names += [f"exact_match@len{n}" for n in self.config.lengths]
        self.higher_is_better: Mapping[str, bool] = MappingProxyType(dict.fromkeys(names, True))

    @property
    def vocabulary(self) -> Vocabulary:
        """The task's token ids."""
        return self.config.vocabulary

    def eval_instances(self, split: str) -> dict[int, Instances]:
        """Length → evaluation instances of ``split`` ("val" or "test"), every evaluated length
        (training lengths, then ``ood_lengths``), ``n_eval_per_length`` each."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return self._data().eval_instances[split]

    def splits(self) -> Splits:
        """Teacher-forcing pairs ``(inputs, targets)`` per split (see :func:`teacher_forced`).

        Train holds about ``n_train`` instances of the training lengths; val and test hold the
        in-distribution instances of :meth:`eval_instances`.
        """
        return self._data().splits

    def make_model(self) -> nn.Module:
        """A fresh :class:`DecoderTransformer` of the configured size; global torch RNG."""
        config = self.config
        return DecoderTransformer(
            config.vocabulary.size, config.block_size, config.n_layer, config.n_head, config.n_embd
        )

    def loss(self, model: nn.Module, batch: object) -> Tensor:
        """Teacher-forced cross-entropy over the batch's answer tokens and ``EOS`` (module docs);
        ``batch = (inputs, targets)``, each ``(B, W)``; returns a scalar."""
        return next_token_loss(model, batch)

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        """Greedy-generation metrics of ``model`` on ``split`` ("val" or "test"); see the class
        docs. With ``primary_only``, only the trained lengths are generated (no ``_ood``
        metrics). Runs in eval mode under ``torch.no_grad`` on the device of the model's first
        parameter; the training mode is restored afterwards."""
        groups = self.eval_instances(split)
        if primary_only:
            trained = set(self.config.train_lengths)
            groups = {n: group for n, group in groups.items() if n in trained}
        exact, tokens, forced = {}, {}, {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for n, group in groups.items():
                    scores = score_group(
                        model, group, self.vocabulary, n <= self.config.max_length
                    )
                    exact[n], tokens[n] = scores.exact, scores.tokens
                    if scores.forced is not None:
                        forced[n] = scores.forced
        finally:
            model.train(was_training)
        in_distribution = self.config.train_lengths
        ood = self.config.ood_lengths
        metrics = {
            "exact_match": pooled_mean({n: exact[n] for n in in_distribution}),
            "token_accuracy": pooled_mean({n: tokens[n] for n in in_distribution}),
            "teacher_forced_accuracy": pooled_mean(forced),
        }
        if ood and not primary_only:
            metrics["exact_match_ood"] = pooled_mean({n: exact[n] for n in ood})
            metrics["token_accuracy_ood"] = pooled_mean({n: tokens[n] for n in ood})
        metrics |= {f"exact_match@len{n}": pooled_mean({n: exact[n]}) for n in exact}
        return metrics


def next_token_loss(model: nn.Module, batch: object) -> Tensor:
    """Mean next-token cross-entropy over the positions whose target is not
    :data:`IGNORE_INDEX`: ``batch = (inputs, targets)``, each ``(B, W)`` int64, ``targets[:, j]``
    the token that should follow ``inputs[:, :j + 1]``; moves the batch to the model's device;
    returns a scalar (nats per scored token)."""
    inputs, targets = batch
    device = _device(model)
    logits = model(inputs.to(device))
    return F.cross_entropy(
        logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=IGNORE_INDEX
    )


@dataclass(frozen=True)
class GroupScores:
    """Position-wise scores of one :class:`Instances` group of ``m`` instances with ``L``-token
    targets (``answer EOS``): ``exact`` ``(m,)`` and ``tokens`` ``(m, L)`` under greedy
    decoding, ``forced`` ``(m, L)`` the argmax given the true prefix (``None`` if not asked)."""

    exact: Tensor
    tokens: Tensor
    forced: Tensor | None


def score_group(
    model: nn.Module, group: Instances, vocabulary: Vocabulary, teacher_forced: bool = True
) -> GroupScores:
    """Decode ``group`` greedily from its contexts for as many steps as its targets have tokens
    and score the result against the targets (:mod:`beyondloss.metrics.sequence`); with
    ``teacher_forced``, also the argmax predictions given the true prefix. The model's mode and
    grad state are the caller's; runs on the device of the model's first parameter."""
    device = _device(model)
    context, target = group.context.to(device), group.target.to(device)
    generated = greedy_generate(model, context, target.shape[1], vocabulary.eos, vocabulary.pad)
    forced = None
    if teacher_forced:
        logits = model(torch.cat([context, target[:, :-1]], dim=1))
        forced = token_matches(logits[:, context.shape[1] - 1 :].argmax(dim=-1), target)
    return GroupScores(exact_match(generated, target), token_matches(generated, target), forced)


def _device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def make_sequence_task(size: str, data_seed: int, problem: str = "sort") -> SequenceTask:
    """:class:`SequenceTask` for ``problem`` at :meth:`SequenceConfig.quick` (``size="quick"``)
    or :meth:`SequenceConfig.full` (``size="full"``), data seeded by ``data_seed``."""
    if size not in ("quick", "full"):
        raise ValueError(f"unknown task size {size!r}; expected 'quick' or 'full'")
    make_config = SequenceConfig.quick if size == "quick" else SequenceConfig.full
    return SequenceTask(make_config(data_seed, problem))
