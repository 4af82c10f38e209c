"""Instruction fine-tuning task: instructions, reproducible disjoint data, answer-only loss, cached
deterministic pretraining, copies of the pretrained model, greedy-generation metrics."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from beyondloss.tasks import make_task
from beyondloss.tasks.base import Task
from beyondloss.tasks.finetuning import (
    _PRETRAINED,
    FinetuningConfig,
    FinetuningTask,
    corpus_lines,
    language_modelling,
    make_finetuning_task,
    pretrain,
    pretrained_model,
)
from beyondloss.tasks.sequences import IGNORE_INDEX, next_token_loss
from beyondloss.tasks.text import INSTRUCTIONS, VOCABULARY, decode, encode
from beyondloss.train import TrainConfig, train

TINY = FinetuningConfig(
    n_letters=6,
    min_length=3,
    max_length=5,
    n_train=300,
    n_eval_per_length=20,
    n_words=60,
    max_word_length=4,
    n_corpus=1500,
    pretrain_steps=40,
    pretrain_batch_size=32,
    n_layer=1,
    n_head=2,
    n_embd=16,
    epochs=1,
    batch_size=32,
)


def split_prompt(tokens: list[int]) -> tuple[str, str]:
    """(instruction name, argument) of a prompt's tokens (``SEP`` and anything after ignored)."""
    verb, argument = decode(tokens).split("\n")[0].split(" ")
    name = next(name for name, ins in INSTRUCTIONS.items() if ins.verb == verb)
    return name, argument


class Oracle(nn.Module):
    """Logit 20 on the true next answer token after ``SEP`` for the instructions in ``solves``;
    on the others, ``EOS`` straight away."""

    def __init__(self, solves: tuple[str, ...] = tuple(INSTRUCTIONS)) -> None:
        super().__init__()
        self.solves = solves
        self.scale = 1.0
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, VOCABULARY.size)
        for b, row in enumerate(idx.tolist()):
            if VOCABULARY.sep not in row:
                continue
            sep = row.index(VOCABULARY.sep)
            name, argument = split_prompt(row)
            answer = encode(INSTRUCTIONS[name].solve(argument)) if name in self.solves else []
            for k, token in enumerate([*answer, VOCABULARY.eos]):
                if sep + k < len(row):
                    logits[b, sep + k, token] = 20.0
        return logits * self.scale + self.anchor

    def zero(self) -> "Oracle":
        """Zero logits everywhere: probability ``1/V`` on every token."""
        self.scale = 0.0
        return self


def test_instructions_on_hand_made_cases() -> None:
    reverse, sort, parity = (INSTRUCTIONS[name] for name in ("reverse", "sort", "parity"))
    assert reverse.solve("abcde") == "edcba"
    assert sort.solve("dbca") == "abcd" and sort.solve("babca") == "aabbc"
    assert parity.solve("3141") == "1001" and parity.solve("2468") == "0000"
    assert sort.prompt("dbca") == "sort dbca\n"
    assert parity.statement("3141") == "parity 3141 is 1001."
    assert decode(encode("sort dbca\n")) == "sort dbca\n"
    assert encode("a\n") == [0, VOCABULARY.sep]
    assert decode([0, VOCABULARY.eos, VOCABULARY.pad]) == "a"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode("Sort!")


def test_data_are_reproducible_and_evaluation_instances_unseen() -> None:
    first, again = FinetuningTask(TINY), FinetuningTask(TINY)
    other = FinetuningTask(replace(TINY, seed=1))
    for split in ("train", "val", "test"):
        for a, b in zip(
            getattr(first.splits(), split).tensors,
            getattr(again.splits(), split).tensors,
            strict=True,
        ):
            assert torch.equal(a, b)
    assert not torch.equal(first.splits().train.tensors[0], other.splits().train.tensors[0])
    assert corpus_lines(TINY) == corpus_lines(TINY) != corpus_lines(replace(TINY, seed=1))
    held_out = set()
    for split in ("val", "test"):
        groups = first.eval_instances(split)
        assert set(groups) == {(name, n) for name in INSTRUCTIONS for n in TINY.lengths}
        for (name, n), group in groups.items():
            assert group.context.shape[0] == group.target.shape[0] == TINY.n_eval_per_length
            for context, target in zip(group.context.tolist(), group.target.tolist(), strict=True):
                prompted, argument = split_prompt(context)
                assert prompted == name and len(argument) == n and context[-1] == VOCABULARY.sep
                assert target == encode(INSTRUCTIONS[name].solve(argument)) + [VOCABULARY.eos]
                held_out.add((name, argument))
    assert len(held_out) > len(INSTRUCTIONS) * len(TINY.lengths) * TINY.n_eval_per_length
    train_inputs = first.splits().train.tensors[0]
    assert 0.9 * TINY.n_train < len(train_inputs) <= TINY.n_train
    for row in train_inputs.tolist():
        name, argument = split_prompt(row)
        assert (name, argument) not in held_out
        assert TINY.min_length <= len(argument) <= TINY.max_length
    for line in corpus_lines(TINY):
        verb, *rest = line.split(" ")
        statement = [name for name, ins in INSTRUCTIONS.items() if ins.verb == verb]
        assert not statement or (statement[0], rest[0]) not in held_out


def test_loss_scores_the_answer_and_eos_only() -> None:
    task = FinetuningTask(TINY)
    inputs, targets = task.splits().train.tensors
    for row, target in zip(inputs[:50].tolist(), targets[:50].tolist(), strict=True):
        name, argument = split_prompt(row)
        sep = row.index(VOCABULARY.sep)
        scored = [token for token in target if token != IGNORE_INDEX]
        assert scored == encode(INSTRUCTIONS[name].solve(argument)) + [VOCABULARY.eos]
        assert target[:sep] == [IGNORE_INDEX] * sep and target[sep] != IGNORE_INDEX
    batch = task.splits().val.tensors
    chance = math.log(VOCABULARY.size)
    assert task.loss(Oracle(solves=()).zero(), batch).item() == pytest.approx(chance)
    assert task.loss(Oracle(), batch).item() < 1e-3


def test_corpus_pairs_predict_every_next_token() -> None:
    inputs, targets = language_modelling(["ab.", "sort ba is ab."]).tensors
    first = encode("ab.") + [VOCABULARY.eos]
    assert inputs[0].tolist()[:3] == first[:3] and targets[0].tolist()[:3] == first[1:]
    assert targets[0].tolist()[3:] == [IGNORE_INDEX] * (inputs.shape[1] - 3)
    assert targets[1].tolist()[-1] == VOCABULARY.eos


def test_pretraining_is_deterministic_cached_and_keeps_the_global_rng() -> None:
    _PRETRAINED.clear()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model = pretrained_model(TINY)
    assert torch.equal(torch.get_rng_state(), state)
    assert pretrained_model(replace(TINY, epochs=3, n_train=50, batch_size=8)) is model
    assert pretrained_model(replace(TINY, pretrain_steps=41)) is not model
    again = pretrain(TINY)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    corpus = language_modelling(corpus_lines(TINY)).tensors
    torch.manual_seed(TINY.seed)
    fresh = FinetuningTask(replace(TINY, pretrained=False)).make_model()
    assert next_token_loss(model, corpus).item() < 0.8 * next_token_loss(fresh, corpus).item()


def test_make_model_returns_independent_copies_of_the_pretrained_weights() -> None:
    task = FinetuningTask(TINY)
    pretrained = pretrained_model(TINY)
    state = torch.get_rng_state()
    first, second = task.make_model(), task.make_model()
    assert torch.equal(torch.get_rng_state(), state)
    for name, value in pretrained.state_dict().items():
        assert torch.equal(first.state_dict()[name], value)
    with torch.no_grad():
        first.head.weight.add_(1.0)
    assert torch.equal(second.head.weight, pretrained.head.weight)
    assert not torch.equal(first.head.weight, pretrained.head.weight)
    scratch = FinetuningTask(replace(TINY, pretrained=False))
    assert scratch.name == "sft-scratch"
    torch.manual_seed(0)
    fresh = scratch.make_model()
    torch.manual_seed(0)
    assert torch.equal(fresh.head.weight, scratch.make_model().head.weight)
    assert not torch.equal(fresh.head.weight, pretrained.head.weight)


def test_evaluate_keys_and_a_model_that_solves_one_instruction() -> None:
    task = FinetuningTask(TINY)
    perfect = task.evaluate(Oracle(), "test")
    assert set(perfect) == set(task.higher_is_better)
    assert all(value == 1.0 for value in perfect.values()), perfect
    model = Oracle(solves=("reverse",)).train()
    one = task.evaluate(model, "val")
    assert model.training
    assert one["exact_match@reverse"] == 1.0
    assert one["exact_match@sort"] == one["exact_match@parity"] == 0.0
    assert one["exact_match"] == pytest.approx(1 / 3)
    assert all(one[f"exact_match@len{n}"] == pytest.approx(1 / 3) for n in TINY.lengths)
    assert one["token_accuracy"] == pytest.approx(1 / 3)  # the others miss every token
    primary = task.evaluate(model, "val", primary_only=True)
    assert "teacher_forced_accuracy" not in primary
    assert primary == {name: one[name] for name in primary}
    with pytest.raises(ValueError, match="split"):
        task.evaluate(model, "train")


def test_one_epoch_through_the_training_loop() -> None:
    task = FinetuningTask(TINY)
    assert isinstance(task, Task)
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = train(
        model,
        optimizer,
        task.splits().train,
        task.loss,
        TrainConfig(epochs=task.epochs, batch_size=task.batch_size, seed=0),
        [lambda model, epoch: task.evaluate(model, "val", primary_only=True)],
        progress=False,
    )
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert 0.0 <= history[0]["exact_match"] <= 1.0


def test_registered_sizes() -> None:
    task = make_task("sft", "full", seed=2)
    assert isinstance(task, FinetuningTask) and task.config == FinetuningConfig.full(2)
    assert make_finetuning_task("quick", 0).config == FinetuningConfig.quick(0)
    with pytest.raises(ValueError, match="size"):
        make_finetuning_task("huge", 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_letters": 27}, "n_letters"),
        ({"min_length": 1}, "min_length"),
        ({"max_length": 2}, "max_length"),
        ({"n_words": 10_000}, "n_words"),
        ({"pretrain_lr": 0.0}, "pretrain_lr"),
        ({"n_embd": 10, "n_head": 4}, "divisible"),
        ({"pretrain_steps": 0}, "pretrain_steps"),
    ],
)
def test_config_validation(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)
