"""Sequence tasks: deterministic disjoint data, causal model, loss and greedy-generation metrics."""

import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from torch import nn

from beyondloss.metrics.sequence import exact_match, pooled_mean, token_matches
from beyondloss.tasks.base import Task
from beyondloss.tasks.sequences import (
    IGNORE_INDEX,
    PROBLEMS,
    SequenceConfig,
    SequenceTask,
    greedy_generate,
    make_sequence_task,
)

TINY = SequenceConfig(
    n_symbols=6,
    min_length=3,
    max_length=5,
    ood_lengths=(7,),
    n_train=200,
    n_eval_per_length=40,
    n_layer=1,
    n_head=2,
    n_embd=16,
    epochs=1,
    batch_size=32,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def solve(problem: str, prompt: list[int]) -> list[int]:
    return sorted(prompt) if problem == "sort" else prompt[::-1]


class Oracle(nn.Module):
    """Logit 10 on the true next token wherever the prefix has ``SEP`` (answer part), else 0."""

    def __init__(self, task: SequenceTask) -> None:
        super().__init__()
        self.problem, self.vocabulary = task.config.problem, task.vocabulary
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocabulary.size)
        for b, row in enumerate(idx.tolist()):
            if self.vocabulary.sep not in row:
                continue
            sep = row.index(self.vocabulary.sep)
            answer = solve(self.problem, row[:sep]) + [self.vocabulary.eos]
            for k, token in enumerate(answer):
                if sep + k < len(row):
                    logits[b, sep + k, token] = 10.0
        return logits + self.anchor


class Uniform(nn.Module):
    """Zero logits everywhere: probability ``1/V`` on every token."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab_size)


class Noise(nn.Module):
    """Independent standard-normal logits at every position: uniformly random argmax tokens."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.randn(*idx.shape, self.vocab_size) + self.anchor


def test_metric_functions_on_a_hand_made_case() -> None:
    target = torch.tensor([[1, 2, 3, 9], [1, 2, 3, 9], [1, 2, 3, 9]])
    generated = torch.tensor(
        [
            [1, 2, 3, 9],  # right
            [1, 3, 9, 0],  # skipped the 2: every later position is off
            [1, 2, 4, 9],  # one substitution
        ]
    )
    assert exact_match(generated, target).tolist() == [True, False, False]
    assert token_matches(generated, target).sum(dim=1).tolist() == [4, 1, 3]
    groups = {4: token_matches(generated, target), 1: torch.tensor([True])}
    assert pooled_mean(groups) == pytest.approx(9 / 13)
    with pytest.raises(ValueError, match="same shape"):
        exact_match(generated[:, :3], target)
    with pytest.raises(ValueError, match="at least one"):
        pooled_mean({})


@pytest.mark.parametrize("problem", PROBLEMS)
def test_data_are_deterministic_by_seed_and_splits_are_disjoint(problem: str) -> None:
    config = replace(TINY, problem=problem)
    first, again = SequenceTask(config), SequenceTask(config)
    other = SequenceTask(replace(config, seed=1))
    for a, b in zip(first.splits().train.tensors, again.splits().train.tensors, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.splits().train.tensors[0], other.splits().train.tensors[0])
    assert list(first.eval_instances("test")) == [3, 4, 5, 7]
    prompts = {}
    for split in ("val", "test"):
        for n, group in first.eval_instances(split).items():
            assert torch.equal(group.context, again.eval_instances(split)[n].context)
            assert group.context.shape == group.target.shape == (40, n + 1)
            prompts[split, n] = {tuple(row[:-1]) for row in group.context.tolist()}
    assert prompts["val", 7].isdisjoint(prompts["test", 7])
    held_out = set().union(*prompts.values())
    for row in first.splits().train.tensors[0].tolist():
        sep = row.index(first.vocabulary.sep)
        assert tuple(row[:sep]) not in held_out
        assert config.min_length <= sep <= config.max_length


@pytest.mark.parametrize("problem", PROBLEMS)
def test_answers_and_teacher_forcing_layout(problem: str) -> None:
    task = SequenceTask(replace(TINY, problem=problem))
    vocabulary = task.vocabulary
    for group in task.eval_instances("val").values():
        for context, target in zip(group.context.tolist(), group.target.tolist(), strict=True):
            assert context[-1] == vocabulary.sep and target[-1] == vocabulary.eos
            assert target[:-1] == solve(problem, context[:-1])
    inputs, targets = task.splits().val.tensors
    assert inputs.shape == targets.shape == (3 * 40, 2 * TINY.max_length + 1)
    row, target = inputs[0].tolist(), targets[0].tolist()  # length 3: prompt SEP answer PAD…
    assert row[:7] == [*row[:3], vocabulary.sep, *solve(problem, row[:3])]
    assert row[7:] == [vocabulary.pad] * 4
    assert target == [IGNORE_INDEX] * 3 + row[4:7] + [vocabulary.eos] + [IGNORE_INDEX] * 4


def test_model_shapes_and_causality() -> None:
    task = SequenceTask(TINY)
    torch.manual_seed(0)
    model = task.make_model().eval()
    idx = torch.randint(0, task.vocabulary.size, (3, TINY.block_size))
    logits = model(idx)
    assert logits.shape == (3, TINY.block_size, task.vocabulary.size)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % task.vocabulary.size
    after = model(changed)
    assert torch.equal(after[:, :7], logits[:, :7])
    assert not torch.allclose(after[:, 7:], logits[:, 7:])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert {"blocks.0.attn.query", "blocks.0.attn.key", "blocks.0.attn.value"} <= set(linears)
    assert linears[-1] == "head"
    assert model.head.weight.data_ptr() != model.token_embedding.weight.data_ptr()


def test_loss_counts_answer_tokens_only() -> None:
    task = SequenceTask(TINY)
    batch = task.splits().val.tensors
    chance = math.log(task.vocabulary.size)
    assert task.loss(Uniform(task.vocabulary.size), batch).item() == pytest.approx(chance)
    assert task.loss(Oracle(task), batch).item() < 1e-3


def test_greedy_generation_stops_at_eos() -> None:
    class Script(nn.Module):
        """Emits 1, EOS, 2, 2, … whatever the input."""

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            step = idx.shape[1] - 2
            token = [1, 4][step] if step < 2 else 2
            return nn.functional.one_hot(torch.full(idx.shape, token), 6).float()

    generated = greedy_generate(Script(), torch.zeros(2, 2, dtype=torch.long), 4, eos=4, pad=5)
    assert generated.tolist() == [[1, 4, 5, 5]] * 2


@pytest.mark.parametrize("problem", PROBLEMS)
def test_oracle_is_perfect_at_every_length(problem: str) -> None:
    task = SequenceTask(replace(TINY, problem=problem))
    metrics = task.evaluate(Oracle(task), "test")
    assert set(metrics) == set(task.higher_is_better)
    assert all(value == 1.0 for value in metrics.values()), metrics


def test_noise_model_scores_chance() -> None:
    """Random argmax tokens: position k of an ``n + 1``-token target is right with probability
    ``(1/V)(1 - 1/V)^k`` (right token, and no random EOS before it), exact match ≈ 0."""
    task = SequenceTask(replace(TINY, n_eval_per_length=400))
    torch.manual_seed(0)
    model = Noise(task.vocabulary.size).train()
    metrics = task.evaluate(model, "val")
    assert model.training
    p = 1 / task.vocabulary.size
    lengths = TINY.train_lengths
    expected = sum(p * (1 - p) ** k for n in lengths for k in range(n + 1))
    expected /= sum(n + 1 for n in lengths)
    assert metrics["token_accuracy"] == pytest.approx(expected, abs=0.01)
    assert metrics["teacher_forced_accuracy"] == pytest.approx(p, abs=0.01)
    assert metrics["exact_match"] < 0.01 and metrics["exact_match_ood"] == 0.0


def test_training_lowers_the_loss_and_task_protocol() -> None:
    task = make_sequence_task("quick", 0, problem="reverse")
    assert isinstance(task, Task) and task.name == "sequences-reverse"
    assert task.config == SequenceConfig.quick(0, "reverse")
    tiny = SequenceTask(TINY)
    torch.manual_seed(0)
    model = tiny.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs, targets = tiny.splits().train.tensors
    before = tiny.loss(model, (inputs, targets)).item()
    for _ in range(30):
        optimizer.zero_grad()
        tiny.loss(model, (inputs, targets)).backward()
        optimizer.step()
    assert tiny.loss(model, (inputs, targets)).item() < 0.7 * before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"problem": "add"}, "problem"),
        ({"max_length": 2}, "max_length"),
        ({"ood_lengths": (5,)}, "ood_lengths"),
        ({"ood_lengths": (9, 8)}, "ood_lengths"),
        ({"n_embd": 10, "n_head": 4}, "divisible"),
        ({"n_symbols": 1}, "n_symbols"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_config_validation(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)
    with pytest.raises(ValueError, match="size"):
        make_sequence_task("huge", 0)


def test_primary_only_generates_only_the_trained_lengths() -> None:
    task = SequenceTask(TINY)
    every = task.evaluate(Oracle(task), "val")
    primary = task.evaluate(Oracle(task), "val", primary_only=True)
    ood = {f"exact_match@len{n}" for n in TINY.ood_lengths} | {"exact_match_ood"}
    assert TINY.ood_lengths and not ood & set(primary)
    assert primary == {name: every[name] for name in primary}
    assert task.primary_metric in primary
