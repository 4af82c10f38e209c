"""The training protocol's parts: lr schedules, the per-step EMA, budgets (``--epochs``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.evaluation import StepAverageEvaluator
from beyondloss.optim.factory import make_optimizer
from beyondloss.posthoc.averaging import EMA
from beyondloss.schedules import LrMultiplier, check_schedule
from beyondloss.study.ttf import StudySpec
from beyondloss.tasks import TASKS
from beyondloss.train import TrainConfig, train


def test_the_multipliers_follow_their_formulas() -> None:
    cosine = LrMultiplier("cosine", warmup_steps=4, total_steps=14)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0  # the first decayed step is at the full rate
    assert cosine(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert cosine(13) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9))) and cosine(13) > 0
    linear = LrMultiplier("linear", warmup_steps=0, total_steps=10)
    assert [linear(s) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    constant = LrMultiplier("constant", warmup_steps=2, total_steps=5)
    assert [constant(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("schedule", "warmup", "message"),
    [
        ("step", 0.0, "unknown schedule 'step'; expected one of constant, cosine, linear"),
        ("cosine", 1.0, r"warmup must be a fraction of the steps in \[0, 1\), got 1.0"),
        ("cosine", -0.1, "warmup must be a fraction"),
        ("linear", math.nan, "warmup must be a fraction"),
    ],
)
def test_bad_schedules_are_refused_everywhere(schedule: str, warmup: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_schedule(schedule, warmup)
    with pytest.raises(ValueError, match=message):
        TrainConfig(epochs=1, batch_size=1, schedule=schedule, warmup=warmup)
    with pytest.raises(ValueError, match=message):
        StudySpec("lorenz", schedule=schedule, warmup=warmup)


@pytest.mark.parametrize("optimizer_name", ["adamw", "dopr-adamw"])
def test_the_per_step_ema_equals_its_recurrence_over_every_optimizer_step(
    optimizer_name: str,
) -> None:
    """θ̃_1 = θ_1, then θ̃_n = d_n θ̃_{n−1} + (1 − d_n) θ_n with d_n = min(d, n / (n + 9)),
    θ_n the weights after optimizer step n, across epochs and under a schedule."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator)
    data = TensorDataset(x, x.sum(1, keepdim=True).sin())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = make_optimizer(optimizer_name, model, lr=3e-2)
    decay = 0.95
    snapshots: list[list[torch.Tensor]] = []

    class Snapshots:
        def on_step(self, model: nn.Module) -> None:
            snapshots.append([p.detach().clone() for p in model.parameters()])

        def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
            return {}

    ema = StepAverageEvaluator("ema", EMA(decay, warmup=True), {})
    config = TrainConfig(epochs=3, batch_size=8, schedule="cosine", warmup=0.1)
    train(model, optimizer, data, lambda m, b: F.mse_loss(m(b[0]), b[1]), config,
          [Snapshots(), ema], progress=False)  # fmt: skip
    assert len(snapshots) == 3 * 5 and ema.average.n_averaged == 15
    expected = [t.clone() for t in snapshots[0]]
    for n, snapshot in enumerate(snapshots[1:], start=2):
        d = min(decay, n / (n + 9))
        expected = [d * e + (1 - d) * s for e, s in zip(expected, snapshot, strict=True)]
    for got, want in zip(ema.average.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(ema.average.module.parameters()), snapshots[-1][0])


def test_epochs_override_the_task_budget_and_name_the_runs() -> None:
    spec = StudySpec("lorenz", epochs=7, schedule="cosine", warmup=0.05)
    task = spec.make_task()
    assert task.epochs == 7 and TASKS["lorenz"]("quick", 0).epochs != 7
    assert task.batch_size == TASKS["lorenz"]("quick", 0).batch_size
    assert spec.run_id("adamw", 1e-3, 0) == "lorenz-quick-adamw-lr0.001-ep7-cosine-wu0.05-s0"
    assert StudySpec("lorenz").run_id("adamw", 1e-3, 0) == "lorenz-quick-adamw-lr0.001-s0"
    assert StudySpec("lorenz", warmup=0.1).name == "ttf-lorenz-quick-constant-wu0.1"
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
            StudySpec("lorenz", epochs=bad)


def test_the_ema_transform_keeps_one_average_per_decay() -> None:
    spec = StudySpec("lorenz", transforms=("swa", "ema", "epoch-ema"), ema_decays=(0.99, 0.999))
    assert spec.weight_transforms == ("swa", "ema0.99", "ema0.999", "epoch-ema")
    assert spec.run_id("adamw", 1e-3, 0).endswith("-swa+ema0.99+ema0.999+epoch-ema-s0")
    for bad in ((1.0,), (0.0,), ()):
        with pytest.raises(ValueError, match=r"ema_decays must lie in \(0, 1\)"):
            StudySpec("lorenz", transforms=("ema",), ema_decays=bad)


def test_checkpoint_choice_takes_the_epoch_validation_selects_and_labels_the_oracle() -> None:
    from beyondloss.selection.checkpoints import best_epoch_metrics

    nan = math.nan
    curves = {
        "epoch": [1.0, 2.0, 3.0, 4.0],
        "val_score": [nan, 0.5, nan, 0.4],
        "test_score": [nan, 0.3, nan, 0.6],
        "ema0.9_val_score": [0.1, 0.7, 0.2, 0.7],  # a tie: the earliest epoch
        "ema0.9_test_score": [0.9, 0.2, 0.1, 0.4],
    }
    got = best_epoch_metrics(curves, ("", "ema0.9_", "swa_"), "score", higher_is_better=True)
    assert got["val_score@best"] == 0.5 and got["test_score@best"] == 0.3
    assert got["epoch@best"] == 2.0 and got["test_score@oracle"] == 0.6
    assert got["ema0.9_epoch@best"] == 2.0 and got["ema0.9_test_score@best"] == 0.2
    assert got["ema0.9_test_score@oracle"] == 0.9
    assert all(math.isnan(got[f"swa_{name}"]) for name in ("epoch@best", "test_score@oracle"))
    lower = best_epoch_metrics(curves, ("",), "score", higher_is_better=False)
    assert lower["epoch@best"] == 4.0 and lower["test_score@oracle"] == 0.3


def test_the_per_step_ema_recomputes_batchnorm_only_when_it_is_evaluated() -> None:
    """BatchNorm statistics of the average cost a pass over the loader: once per evaluation,
    not once per epoch or per step."""
    x = torch.randn(32, 3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    ema = StepAverageEvaluator(
        "ema", EMA(0.9, warmup=True, bn_loader=[x]), {"val": lambda m: {"out": 0.0}}, every=2,
        last_epoch=3,
    )  # fmt: skip
    calls: list[int] = []
    recompute = ema.average.recompute_bn
    ema.average.recompute_bn = lambda: (calls.append(1), recompute())[1]  # type: ignore[method-assign]
    for epoch in (1, 2, 3):
        for _ in range(4):
            ema.on_step(model)
        metrics = ema(model, epoch)
        assert bool(metrics) == (epoch != 1)
    assert len(calls) == 2  # epochs 2 and 3
