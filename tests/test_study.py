"""Tests of the test-time-feedback study: grid, selection, reports, DoPr-vs-base gains, Kendall τ,
DoPr settings, resume, worker independence, and the study over every registered task.

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
from scipy.stats import kendalltau
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.optim import APConfig
from beyondloss.store import ResultsStore
from beyondloss.study import StudyResult, StudySpec, Summary, run_study, select_lr, summarize, ttf
from beyondloss.study.executor import LocalExecutor
from beyondloss.study.ttf import run_all
from beyondloss.tasks import TASKS, Splits, make_task
from beyondloss.tasks.dynamics import Lorenz63Task, LorenzConfig

SMALL_LR, LARGE_LR = 1e-4, 1e-1


class LinearTask:
    """``y = 3 x_1 - 3 x_2`` from 32 training samples, fitted by one ``nn.Linear(2, 1)``.

    In 2 epochs of 4 steps, lr 1e-1 fits it far better than lr 1e-4 (which barely moves the
    initial weights), for sgd and dopr-sgd alike. The downstream ``score`` is minus the squared
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

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        score = -sum(float(p.square().sum()) for p in model.parameters())
        if primary_only:
            return {"score": score}
        x, y = getattr(self._splits, split).tensors
        return {"err": float(F.mse_loss(model(x), y)), "score": score}


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
        optimizers=("sgd", "dopr-sgd"),
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
    for name in (
        "report.md",
        "table.csv",
        "dopr_vs_base.csv",
        "curves.png",
        "val_loss_vs_downstream.png",
    ):
        assert (study.directory / name).stat().st_size > 0
    run_dir = study.directory / "runs" / "linear-quick-dopr-sgd-lr0.0001-s0"
    assert (run_dir / "checkpoint.pt").exists()
    markdown = (study.directory / "report.md").read_text()
    assert "Command: `beyondloss ttf linear`" in markdown
    assert "Wall time:" in markdown
    assert "| test_score ↑ |" in markdown and "test_err ↓" in markdown
    page = (study.directory / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert '<th style="text-align:right">test_score ↑</th>' in page
    assert page.count('<img src="data:image/png;base64,') == 2 and 'src="curves.png"' not in page
    with open(study.directory / "table.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4
    assert {
        "val_loss_mean",
        "val_loss_std",
        "val_loss_ci95",
        "test_err_mean",
        "selected_by_val_score",
    } <= set(rows[0])


def test_study_records_runs_in_the_store(study: StudyResult) -> None:
    with ResultsStore(study.directory.parent / "beyondloss.db") as store:
        runs = store.runs(optimizer="dopr-sgd", lr=LARGE_LR, status="complete")
        curves = store.curves("linear-quick-dopr-sgd-lr0.1-s0")
    assert sorted(run["seed"] for run in runs) == [0, 1]
    assert runs[0]["task"] == "linear" and runs[0]["config"]["epochs"] == 2
    assert "dopr" not in runs[0]["config"]
    assert curves["epoch"] == [1.0, 2.0]
    assert {"val_loss", "val_score", "test_err", "test_score"} <= set(curves)


def test_only_the_final_test_evaluation_asks_for_every_metric(study: StudyResult) -> None:
    with ResultsStore(study.directory.parent / "beyondloss.db") as store:
        curves = store.curves("linear-quick-dopr-sgd-lr0.1-s0")
    assert "val_err" not in curves
    assert all(math.isfinite(v) for v in curves["val_score"] + curves["test_score"])
    assert math.isnan(curves["test_err"][0]) and math.isfinite(curves["test_err"][1])


def test_val_loss_selects_the_lr_with_the_lowest_mean_val_loss(study: StudyResult) -> None:
    assert {opt: s.lr for opt, s in study.by_val_loss.items()} == {
        "sgd": LARGE_LR,
        "dopr-sgd": LARGE_LR,
    }
    chosen = study.by_val_loss["sgd"]
    assert chosen.n == 2
    assert chosen.mean["val_loss"] == min(
        s.mean["val_loss"] for s in study.summaries if s.optimizer == "sgd"
    )


def test_downstream_selection_respects_higher_is_better(study: StudyResult) -> None:
    assert {opt: s.lr for opt, s in study.by_downstream.items()} == {
        "sgd": SMALL_LR,
        "dopr-sgd": SMALL_LR,
    }


def test_rerun_skips_completed_runs(study: StudyResult) -> None:
    again = run_study(_spec(study.directory.parent), progress=False)
    assert again.trained == () and len(again.skipped) == 8
    assert _means(again) == _means(study)


def test_rerun_trains_only_incomplete_runs(study: StudyResult) -> None:
    spec = _spec(study.directory.parent)
    run_id = spec.run_id("dopr-sgd", SMALL_LR, 1)
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
    # t_{0.975, 1} · √2 / √2: the 95% half-width of two values one apart from their mean.
    assert first.half_width["val_loss"] == pytest.approx(12.706204736)
    assert second.n == 1 and math.isnan(second.std["val_loss"])
    assert math.isnan(second.half_width["val_loss"])


def test_select_lr_ranks_diverged_configurations_last() -> None:
    def summary(lr: float, value: float) -> Summary:
        return Summary("a", lr, 1, {"m": value}, {"m": math.nan})

    summaries = [summary(0.3, math.nan), summary(0.1, 2.0), summary(0.2, 1.0)]
    assert select_lr(summaries, "m")["a"].lr == 0.2
    assert select_lr(summaries, "m", higher_is_better=True)["a"].lr == 0.1
    assert select_lr([summary(0.1, math.inf), summary(0.2, 5.0)], "m")["a"].lr == 0.2
    diverged_before_any_rollout = Summary("a", 0.3, 1, {"val_loss": math.nan}, {})
    assert select_lr([diverged_before_any_rollout, summary(0.1, 2.0)], "m")["a"].lr == 0.1


def test_spec_defaults_and_run_ids() -> None:
    quick, full = StudySpec("lorenz"), StudySpec("lorenz", size="full")
    assert quick.grid_lrs == (1e-3, 3e-3, 1e-2)
    assert full.grid_lrs == (3e-4, 1e-3, 3e-3, 1e-2)
    assert (quick.seeds, full.seeds, StudySpec("lorenz", size="full", seeds=2).seeds) == (3, 5, 2)
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
        ({"task": "nope"}, "unknown task 'nope': choose from lorenz"),
        ({"size": "huge"}, "unknown size"),
        ({"optimizers": ("adamw", "adam")}, "unknown optimizer 'adam': choose from adamw"),
        ({"optimizers": ()}, "at least one optimizer"),
        ({"optimizers": ("sgd", "sgd")}, "distinct"),
        ({"lrs": (1e-3, -1e-3)}, "learning rates must be finite and > 0"),
        ({"lrs": (1e-3, 0.001)}, "distinct"),
        ({"seeds": 0}, "seeds"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"workers": 0}, "workers"),
        ({"dopr": {"cov": 2}}, r"unknown dopr settings \['cov'\]"),
        ({"dopr": {"cov_every": 0}}, "cov_every must be an integer >= 1"),
        ({"dopr": {"inverse_every": 2.0}}, "inverse_every must be an integer >= 1"),
        ({"dopr": {"ema_decay": 1.0}}, "ema_decay must be >= 0 and < 1"),
        ({"dopr": {"damping": math.inf}}, "damping must be finite and >= 0"),
        ({"dopr": {"damping": "big"}}, "damping must be a number"),
        ({"dopr": {"damping_mode": "fro"}}, "damping_mode must be one of"),
        ({"optimizers": ("adamw",), "dopr": {"cov_every": 2}}, "dopr-\\* optimizers only"),
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
    with pytest.raises(ValueError, match="unknown task 'lorentz': choose from .*lorenz"):
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


def test_every_activation_preconditioner_setting_can_be_set_by_a_study() -> None:
    assert set(ttf.DOPR_SETTINGS) == set(APConfig.field_names())


def test_dopr_settings_tag_dopr_run_ids_and_drop_defaults() -> None:
    spec = StudySpec(
        "lorenz", dopr={"ema_decay": 0.0, "cov_every": 1, "inverse_every": 1, "damping": 1e-3}
    )
    assert spec.dopr == {"cov_every": 1, "inverse_every": 1, "ema_decay": 0.0}
    assert spec.name == "ttf-lorenz-quick-cov1-inv1-ema0"
    assert spec.run_id("dopr-muon", 1e-3, 0) == "lorenz-quick-dopr-muon-lr0.001-cov1-inv1-ema0-s0"
    assert spec.run_id("muon", 1e-3, 0) == "lorenz-quick-muon-lr0.001-s0"
    assert spec.study_of("muon") == "ttf-lorenz-quick" and spec.study_of("dopr-muon") == spec.name
    decayed = StudySpec("lorenz", weight_decay=0.1, dopr={"damping": 0.01, "damping_mode": "trace"})
    assert decayed.run_id("dopr-adamw", 1e-2, 1) == (
        "lorenz-quick-dopr-adamw-lr0.01-wd0.1-damp0.01-trace-s1"
    )
    assert StudySpec("lorenz", dopr={"cov_every": 10, "damping_mode": "trace_over_dim"}) == (
        StudySpec("lorenz")
    )
    wide = StudySpec("lorenz", dopr={"max_block_size": 64, "grafting": "grad_norm"})
    assert wide.run_id("dopr-sgd", 1e-2, 0) == "lorenz-quick-dopr-sgd-lr0.01-blk64-grad_norm-s0"
    assert StudySpec("lorenz", dopr={"max_block_size": None, "grafting": "none"}) == (
        StudySpec("lorenz")
    )


def test_report_gives_confidence_intervals_gains_and_kendall_tau(study: StudyResult) -> None:
    markdown = (study.directory / "report.md").read_text()
    assert "mean ± 95% CI half-width over the n seeds" in markdown
    assert "## DoPr vs base" in markdown and "| dopr-sgd vs sgd | val_loss |" in markdown
    assert "| test_score: DoPr − base | p | val_loss: base − DoPr | p |" in markdown
    assert "## Val loss vs downstream metric" in markdown and "| val_score | " in markdown
    assert study.tables["dopr_vs_base"] in markdown and study.tables["kendall"] in markdown
    with open(study.directory / "dopr_vs_base.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["criterion"], r["metric"]) for r in rows] == [
        ("val_loss", "test_score"),
        ("val_loss", "val_loss"),
        ("val_score", "test_score"),
        ("val_score", "val_loss"),
    ]


def test_gains_pair_seeds_each_arm_at_its_selected_lr(study: StudyResult) -> None:
    by_loss, by_score = study.gains
    assert (by_loss.criterion, by_loss.dopr.lr, by_loss.base.lr) == ("val_loss", LARGE_LR, LARGE_LR)
    assert (by_score.criterion, by_score.dopr.lr, by_score.base.lr) == (
        "val_score",
        SMALL_LR,
        SMALL_LR,
    )
    spec = _spec(study.directory.parent)
    curves = _all_curves(spec)

    def final(optimizer: str, metric: str, seed: int) -> float:
        return curves[spec.run_id(optimizer, LARGE_LR, seed)][metric][-1]

    score = [final("dopr-sgd", "test_score", s) - final("sgd", "test_score", s) for s in (0, 1)]
    loss = [final("sgd", "val_loss", s) - final("dopr-sgd", "val_loss", s) for s in (0, 1)]
    assert by_loss.pairs == 2 and by_loss.gains["test_score"].n == 2
    assert by_loss.gains["test_score"].mean == pytest.approx(sum(score) / 2)
    assert by_loss.gains["val_loss"].mean == pytest.approx(sum(loss) / 2)


def test_kendall_tau_pools_every_checkpoint_of_every_configuration(study: StudyResult) -> None:
    on_val, on_test = study.mismatch
    assert (on_val.metric, on_test.metric) == ("val_score", "test_score")
    assert on_val.checkpoints.n == 2 * 2 * 2 * 2 and on_val.final.n == 8
    assert on_val.within.groups == 4
    curves = _all_curves(_spec(study.directory.parent)).values()
    losses = [value for run in curves for value in run["val_loss"]]
    scores = [value for run in curves for value in run["val_score"]]
    # The score is higher-is-better, so "lower loss ⇔ better" is a negative raw correlation.
    assert on_val.checkpoints.tau == pytest.approx(-kendalltau(losses, scores).statistic)


def test_dopr_settings_name_new_dopr_runs_and_share_the_baselines(
    study: StudyResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One run, trained in this process (the process pool is covered above).
    monkeypatch.setattr(ttf, "LocalExecutor", lambda workers: LocalExecutor(0))
    spec = replace(_spec(study.directory.parent), lrs=(LARGE_LR,), seeds=1)
    spec = replace(spec, dopr={"cov_every": 1, "inverse_every": 1})
    result = run_study(spec, progress=False)
    assert result.directory.name == "ttf-linear-quick-cov1-inv1"
    assert result.trained == ("linear-quick-dopr-sgd-lr0.1-cov1-inv1-s0",)
    assert result.skipped == ("linear-quick-sgd-lr0.1-s0",)
    with ResultsStore(spec.out / "beyondloss.db") as store:
        [run] = store.runs(run_id=result.trained[0])
        per_step = store.curves(result.trained[0])["val_loss"]
        amortized = store.curves("linear-quick-dopr-sgd-lr0.1-s0")["val_loss"]
    assert run["config"]["dopr"] == {"cov_every": 1, "inverse_every": 1}
    assert run["config"]["study"] == "ttf-linear-quick-cov1-inv1"
    assert per_step != amortized
    assert (result.directory / "runs" / result.trained[0] / "checkpoint.pt").exists()


def test_run_all_studies_each_task_and_survives_a_failure(
    study: StudyResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(TASKS):
        if name != "linear":
            monkeypatch.delitem(TASKS, name)
    monkeypatch.setitem(TASKS, "broken", LinearTask)
    real_run_study = ttf.run_study

    def run_study_failing_on_broken(spec: StudySpec, **options: object) -> StudyResult:
        if spec.task == "broken":
            raise RuntimeError("run broken-quick-sgd failed: boom")
        return real_run_study(spec, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(ttf, "run_study", run_study_failing_on_broken)
    suite = run_all(
        "quick",
        progress=False,
        command="beyondloss ttf all",
        tasks=("linear", "broken"),
        optimizers=("sgd", "dopr-sgd"),
        lrs=(SMALL_LR, LARGE_LR),
        seeds=2,
        out=study.directory.parent,
    )
    assert list(suite.results) == ["linear"] and list(suite.failures) == ["broken"]
    assert suite.results["linear"].trained == () and len(suite.results["linear"].skipped) == 8
    summary = (suite.directory / "summary.md").read_text()
    assert suite.directory.name == "ttf-all-quick" and summary == suite.markdown + "\n"
    assert "Command: `beyondloss ttf all`" in summary and "Total wall time:" in summary
    assert "[Full report](../ttf-linear-quick/report.md)" in summary
    index = (suite.directory / "summary.html").read_text()
    assert '<a href="../ttf-linear-quick/report.html">Full report</a>' in index
    assert suite.results["linear"].tables["dopr_vs_base"] in summary
    assert suite.results["linear"].tables["kendall"] in summary
    assert "## broken\n\nFailed: `RuntimeError: run broken-quick-sgd failed: boom`" in summary


def test_the_quick_suite_is_one_task_per_family_and_the_full_suite_every_task() -> None:
    from beyondloss.tasks import QUICK_SUITE, suite

    assert suite("quick") == tuple(name for name in QUICK_SUITE if name in TASKS)
    assert {"lorenz", "noisy-digits"} <= set(suite("quick")) and "flow-moons" not in QUICK_SUITE
    assert suite("full") == tuple(TASKS)


def test_weight_average_transforms_are_rolled_out_and_selected_post_hoc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ttf, "LocalExecutor", lambda workers: LocalExecutor(0))
    spec = replace(_spec(tmp_path), seeds=1, transforms=("swa", "ema"))
    assert spec.run_id("sgd", LARGE_LR, 0) == "linear-quick-sgd-lr0.1-swa+ema0.999-s0"
    result = run_study(spec, progress=False)
    with ResultsStore(spec.out / "beyondloss.db") as store:
        curves = store.curves(spec.run_id("dopr-sgd", LARGE_LR, 0))
    # SWA over the second half of 2 epochs averages the last snapshot alone: the base model.
    assert curves["swa_test_score"][-1] == curves["test_score"][-1]
    assert curves["ema0.999_test_score"][-1] != curves["test_score"][-1]
    assert "swa_val_score" in curves and "ema0.999_test_err" in curves
    markdown = (result.directory / "report.md").read_text()
    assert "## Weight averages and ensembles, judged by their rollouts" in markdown
    assert "post-hoc selection for EMA0.999/step" in markdown
    with pytest.raises(ValueError, match="distinct names among swa, ema, epoch-ema, ts, ens"):
        StudySpec("linear", transforms=("swa", "tta"))
    with pytest.raises(ValueError, match="'ens' transform needs seeds >= 2"):
        StudySpec("linear", seeds=1, transforms=("ens",))
    with pytest.raises(ValueError, match=r"'ts' transform needs .*noisy-digits.*; linear has none"):
        StudySpec("linear", transforms=("ts",))
    with pytest.raises(ValueError, match="task linear has no metric 'nll'; it has score"):
        StudySpec("linear", metric="nll")
    assert StudySpec("linear", metric="score").metric is None  # the primary metric itself


def test_seed_ensembles_are_deployed_as_one_model_and_selected_post_hoc(tmp_path: Path) -> None:
    spec = replace(_spec(tmp_path), transforms=("swa", "ens"))
    assert spec.run_id("sgd", LARGE_LR, 0) == "linear-quick-sgd-lr0.1-swa-s0"  # ens: no new runs
    assert spec.ensemble_id("sgd", LARGE_LR) == "linear-quick-sgd-lr0.1-swa-ens"
    without = run_study(replace(spec, transforms=("swa",)), progress=False)
    result = run_study(spec, progress=False)
    # The ensembles reuse the runs of the study without them but write their own report.
    assert result.trained == () and result.directory.name == without.directory.name + "-ens"
    assert not (result.directory / "runs").exists()
    assert "Ens" not in (without.directory / "report.md").read_text()
    task = LinearTask("quick", 0)
    x, y = task.splits().test.tensors
    for kind, prefix in (("base", "ens"), ("swa", "swa_ens")):
        members = [ttf.rebuild(ttf.run_job(spec, "dopr-sgd", LARGE_LR, s), kind) for s in range(2)]
        mean = torch.stack([m(x) for m in members]).mean(0).detach()
        with ResultsStore(spec.out / "beyondloss.db") as store:
            stored = store.curves(spec.ensemble_id("dopr-sgd", LARGE_LR))
            [run] = store.runs(run_id=spec.ensemble_id("dopr-sgd", LARGE_LR))
        assert stored[f"{prefix}_test_err"] == [pytest.approx(float(F.mse_loss(mean, y)))]
        assert f"{prefix}_val_score" in stored
    assert run["seed"] == -1 and run["config"]["members"] == [
        spec.run_id("dopr-sgd", LARGE_LR, s) for s in range(2)
    ]
    summary = next(s for s in result.summaries if (s.optimizer, s.lr) == ("dopr-sgd", LARGE_LR))
    assert summary.mean["ens_test_err"] == stored["ens_test_err"][0]
    assert math.isnan(summary.half_width["ens_test_err"])
    markdown = (result.directory / "report.md").read_text()
    assert "post-hoc selection for SWA+Ens" in markdown
    assert "## Which model to deploy" in markdown
    [joint_row] = [row for row in markdown.splitlines() if row.startswith("| **all optimizers**")]
    best = max(
        (s.mean[f"{p}val_score"], s.optimizer, s.lr)
        for s in result.summaries
        for p in ("", "swa_", "ens_", "swa_ens_")
    )
    assert f" {best[1]}, " in joint_row and f"@{best[2]:g}:" in joint_row
    deploy, _, regret_table = result.tables["deploy"].split("\n\n")
    regrets = [
        float(row.split("|")[-2])
        for row in deploy.splitlines()[2:]
        if not row.startswith("| **all")
    ]
    assert len(regrets) == 2 and min(regrets) >= 0
    per_criterion = [row.split("|")[2:-1] for row in regret_table.splitlines()[2:]]
    assert [float(row[-1]) for row in per_criterion] == regrets  # the joint column
    assert len(per_criterion[0]) == 2 + 3 + 1  # val loss, downstream, SWA, Ens, SWA+Ens, joint
    assert all(float(value) >= 0 for row in per_criterion for value in row)
    again = run_study(spec, progress=False)
    assert again.trained == () and again.summaries == result.summaries


def test_eval_every_rolls_out_the_base_model_on_its_cadence_and_at_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Longer(LinearTask):
        name = "longer"
        epochs = 5

    monkeypatch.setitem(TASKS, "longer", Longer)
    monkeypatch.setattr(ttf, "LocalExecutor", lambda workers: LocalExecutor(0))
    spec = StudySpec(
        task="longer", optimizers=("sgd",), lrs=(SMALL_LR,), seeds=1, eval_every=2, out=tmp_path
    )
    result = run_study(spec, progress=False)
    assert result.directory.name == "ttf-longer-quick-eval2"
    assert result.trained == ("longer-quick-sgd-lr0.0001-eval2-s0",)
    with ResultsStore(tmp_path / "beyondloss.db") as store:
        curves = store.curves(result.trained[0])
        [run] = store.runs(run_id=result.trained[0])
    assert all(math.isfinite(v) for v in curves["val_loss"])
    evaluated = [math.isfinite(v) for v in curves["val_score"]]
    assert (
        evaluated
        == [False, True, False, True, True]
        == [math.isfinite(v) for v in curves["test_score"]]
    )
    assert run["config"]["eval_every"] == 2
    assert "rolled out every 2 epochs and at the last" in result.markdown
    assert result.by_downstream["sgd"].mean["val_score"] == curves["val_score"][-1]
