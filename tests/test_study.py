"""Tests of the test-time-feedback study: grid, selection, reports, resume, worker independence.

The study runs on :class:`LinearTask`, a tiny regression registered in the task registry for the
test. Spawned workers import this module by name to rebuild the task, so it must stay importable
without side effects.
"""

from __future__ import annotations

import csv
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.store import ResultsStore
from beyondloss.study import StudyResult, StudySpec, Summary, run_study, select_lr, summarize
from beyondloss.tasks import TASKS, Splits, make_task
from beyondloss.tasks.dynamics import Lorenz63Task, LorenzConfig

SMALL_LR, LARGE_LR = 1e-4, 1e-1


class LinearTask:
    """``y = 3 x_1 - 3 x_2`` from 32 training samples, fitted by one ``nn.Linear(2, 1)``.

    In 2 epochs of 4 steps, lr 1e-1 fits it far better than lr 1e-4 (which barely moves the
    initial weights), for sgd and adamw alike. The downstream ``score`` is minus the squared
    parameter norm, higher is better: it prefers the weights that stayed near their small
    initialisation, so downstream selection picks lr 1e-4 where val-loss selection picks 1e-1.
    """

    name = "linear"
    primary_metric = "score"
    higher_is_better = {"score": True, "err": False}
    epochs = 2
    batch_size = 8

    def __init__(self, size: str, data_seed: int) -> None:
        generator = torch.Generator().manual_seed(data_seed)
        x = torch.randn(64, 2, generator=generator)
        y = x @ torch.tensor([[3.0], [-3.0]])
        self._splits = Splits(
            train=TensorDataset(x[:32], y[:32]),
            val=TensorDataset(x[32:48], y[32:48]),
            test=TensorDataset(x[48:], y[48:]),
        )

    def splits(self) -> Splits:
        return self._splits

    def make_model(self) -> nn.Module:
        return nn.Linear(2, 1)

    def loss(self, model: nn.Module, batch: object) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        x, y = getattr(self._splits, split).tensors
        squared_norm = sum(float(p.square().sum()) for p in model.parameters())
        return {"err": float(F.mse_loss(model(x), y)), "score": -squared_norm}


class NonFiniteTask(LinearTask):
    """LinearTask whose training inputs hold an infinity: DoPr refuses the step."""

    name = "nonfinite"

    def __init__(self, size: str, data_seed: int) -> None:
        super().__init__(size, data_seed)
        x, y = self._splits.train.tensors
        x = x.clone()
        x[5, 0] = math.inf
        self._splits = Splits(TensorDataset(x, y), self._splits.val, self._splits.test)


@pytest.fixture(scope="module", autouse=True)
def linear_task_registered() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TASKS, "linear", LinearTask)
        patch.setitem(TASKS, "nonfinite", NonFiniteTask)
        yield


def _spec(out: Path, workers: int = 2) -> StudySpec:
    return StudySpec(
        task="linear",
        optimizers=("sgd", "adamw"),
        lrs=(SMALL_LR, LARGE_LR),
        seeds=2,
        workers=workers,
        out=out,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyResult:
    return run_study(
        _spec(tmp_path_factory.mktemp("study")), progress=False, command="beyondloss ttf linear"
    )


def _means(result: StudyResult) -> list[tuple[str, float, dict[str, float]]]:
    """Every configuration's mean metrics except the measured ``epoch_seconds``."""
    return [
        (s.optimizer, s.lr, {k: v for k, v in s.mean.items() if k != "epoch_seconds"})
        for s in result.summaries
    ]


def _all_curves(spec: StudySpec) -> dict[str, dict[str, list[float]]]:
    with ResultsStore(spec.out / "beyondloss.db") as store:
        return {
            spec.run_id(*key): {
                name: values
                for name, values in store.curves(spec.run_id(*key)).items()
                if name != "epoch_seconds"
            }
            for key in spec.grid()
        }


def test_study_trains_every_run_and_writes_the_reports(study: StudyResult) -> None:
    assert len(study.trained) == 2 * 2 * 2 and study.skipped == ()
    assert "linear-quick-sgd-lr0.1-s1" in study.trained
    for name in ("table.md", "table.csv", "curves.png"):
        assert (study.directory / name).stat().st_size > 0
    assert (study.directory / "runs" / "linear-quick-adamw-lr0.0001-s0" / "checkpoint.pt").exists()
    markdown = (study.directory / "table.md").read_text()
    assert "Command: `beyondloss ttf linear`" in markdown
    assert "Wall time:" in markdown
    assert "| test_score ↑ |" in markdown and "test_err ↓" in markdown
    with open(study.directory / "table.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4
    assert {"val_loss_mean", "val_loss_std", "test_err_mean", "selected_by_val_score"} <= set(
        rows[0]
    )


def test_study_records_runs_in_the_store(study: StudyResult) -> None:
    with ResultsStore(study.directory.parent / "beyondloss.db") as store:
        runs = store.runs(optimizer="adamw", lr=LARGE_LR, status="complete")
        curves = store.curves("linear-quick-adamw-lr0.1-s0")
    assert sorted(run["seed"] for run in runs) == [0, 1]
    assert runs[0]["task"] == "linear" and runs[0]["config"]["epochs"] == 2
    assert curves["epoch"] == [1.0, 2.0]
    assert {"val_loss", "val_err", "val_score", "test_err", "test_score"} <= set(curves)


def test_val_loss_selects_the_lr_with_the_lowest_mean_val_loss(study: StudyResult) -> None:
    assert {opt: s.lr for opt, s in study.by_val_loss.items()} == {
        "sgd": LARGE_LR,
        "adamw": LARGE_LR,
    }
    chosen = study.by_val_loss["sgd"]
    assert chosen.n == 2
    assert chosen.mean["val_loss"] == min(
        s.mean["val_loss"] for s in study.summaries if s.optimizer == "sgd"
    )


def test_downstream_selection_respects_higher_is_better(study: StudyResult) -> None:
    assert {opt: s.lr for opt, s in study.by_downstream.items()} == {
        "sgd": SMALL_LR,
        "adamw": SMALL_LR,
    }


def test_rerun_skips_completed_runs(study: StudyResult) -> None:
    again = run_study(_spec(study.directory.parent), progress=False)
    assert again.trained == () and len(again.skipped) == 8
    assert _means(again) == _means(study)


def test_rerun_trains_only_incomplete_runs(study: StudyResult) -> None:
    spec = _spec(study.directory.parent)
    run_id = spec.run_id("adamw", SMALL_LR, 1)
    with sqlite3.connect(spec.out / "beyondloss.db") as connection:
        connection.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", (run_id,))
    (spec.directory / "runs" / run_id / "checkpoint.pt").unlink()
    again = run_study(replace(spec, workers=1), progress=False)
    assert again.trained == (run_id,)
    assert _means(again) == _means(study)


def test_results_do_not_depend_on_the_number_of_workers(study: StudyResult, tmp_path: Path) -> None:
    two = _spec(study.directory.parent)
    one = _spec(tmp_path, workers=1)
    run_study(one, progress=False)
    assert _all_curves(one) == _all_curves(two)


def test_summarize_gives_mean_and_sample_std_over_seeds() -> None:
    finals = {
        ("a", 0.1, 0): {"val_loss": 1.0},
        ("a", 0.1, 1): {"val_loss": 3.0},
        ("a", 0.2, 0): {"val_loss": 5.0},
    }
    first, second = summarize(finals)
    assert (first.n, first.mean["val_loss"], first.std["val_loss"]) == (2, 2.0, math.sqrt(2.0))
    assert second.n == 1 and math.isnan(second.std["val_loss"])


def test_select_lr_ranks_diverged_configurations_last() -> None:
    def summary(lr: float, value: float) -> Summary:
        return Summary("a", lr, 1, {"m": value}, {"m": math.nan})

    summaries = [summary(0.3, math.nan), summary(0.1, 2.0), summary(0.2, 1.0)]
    assert select_lr(summaries, "m")["a"].lr == 0.2
    assert select_lr(summaries, "m", higher_is_better=True)["a"].lr == 0.1
    assert select_lr([summary(0.1, math.inf), summary(0.2, 5.0)], "m")["a"].lr == 0.2


def test_spec_defaults_and_run_ids() -> None:
    quick, full = StudySpec("lorenz"), StudySpec("lorenz", size="full")
    assert quick.grid_lrs == (1e-3, 3e-3, 1e-2)
    assert full.grid_lrs == (3e-4, 1e-3, 3e-3, 1e-2)
    assert quick.optimizers == ("adamw", "dopr-adamw", "muon", "dopr-muon")
    assert quick.run_id("dopr-adamw", 3e-3, 0) == "lorenz-quick-dopr-adamw-lr0.003-s0"
    assert quick.directory == Path("runs") / "ttf-lorenz-quick"
    assert len(list(quick.grid())) == 4 * 3 * 3
    decayed = StudySpec("lorenz", weight_decay=0.01)
    assert decayed.run_id("adamw", 1e-3, 2) == "lorenz-quick-adamw-lr0.001-wd0.01-s2"
    assert decayed.name == "ttf-lorenz-quick-wd0.01"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "nope"}, "unknown task 'nope'; expected one of"),
        ({"size": "huge"}, "unknown size"),
        ({"optimizers": ("adamw", "adam")}, "unknown optimizers"),
        ({"optimizers": ()}, "at least one optimizer"),
        ({"optimizers": ("sgd", "sgd")}, "distinct"),
        ({"lrs": (1e-3, -1e-3)}, "positive"),
        ({"lrs": (1e-3, 0.001)}, "distinct"),
        ({"seeds": 0}, "seeds"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"workers": 0}, "workers"),
    ],
)
def test_spec_rejects_invalid_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StudySpec(**{"task": "lorenz", **changes})  # type: ignore[arg-type]


def test_task_registry_builds_lorenz_and_names_known_tasks() -> None:
    task = make_task("lorenz", "full", seed=4)
    assert isinstance(task, Lorenz63Task)
    assert task.config == LorenzConfig.full(4)
    assert make_task("lorenz").config == LorenzConfig.quick(0)
    with pytest.raises(ValueError, match="unknown task 'lorentz'; expected one of .*lorenz"):
        make_task("lorentz")
    with pytest.raises(ValueError, match="unknown task size"):
        make_task("lorenz", "medium")


def test_a_diverged_run_is_recorded_and_ranked_last_not_fatal(tmp_path: Path) -> None:
    spec = StudySpec(
        task="nonfinite",
        optimizers=("dopr-sgd",),
        lrs=(SMALL_LR,),
        seeds=1,
        workers=1,
        out=tmp_path,
    )
    result = run_study(spec, progress=False)
    with ResultsStore(tmp_path / "beyondloss.db") as store:
        run_id = spec.run_id("dopr-sgd", SMALL_LR, 0)
        assert store.is_complete(run_id)
        assert store.curves(run_id)["diverged"] == [1.0]
    assert math.isnan(result.summaries[0].mean["val_loss"])
