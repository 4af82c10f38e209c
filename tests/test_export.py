"""The model a study selects is rebuilt from its checkpoints, written, and loaded back into the
task's own architecture with exactly the test metrics the store holds for it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from beyondloss.cli import main
from beyondloss.evaluation import calibrated
from beyondloss.posthoc.ensemble import OutputEnsemble
from beyondloss.posthoc.temperature import TemperatureScaled
from beyondloss.store import ResultsStore
from beyondloss.study import StudySpec, run_study, ttf
from beyondloss.study.executor import LocalExecutor
from beyondloss.study.export import export_model, load_model, select_model
from beyondloss.tasks import TASKS
from beyondloss.tasks.dynamics import Lorenz63Task, LorenzConfig
from beyondloss.tasks.noisy_labels import make_noisy_task


def tiny_lorenz(size: str, data_seed: int) -> Lorenz63Task:
    config = replace(
        LorenzConfig.quick(data_seed), epochs=3, train_steps=400, n_rollouts=20, horizon_lt=3.0
    )
    return Lorenz63Task(config)


def tiny_digits(size: str, data_seed: int):
    task = make_noisy_task("quick", data_seed)
    task.epochs = 6
    return task


@pytest.fixture(scope="module", autouse=True)
def tiny_tasks() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TASKS, "tiny-lorenz", tiny_lorenz)
        patch.setitem(TASKS, "tiny-digits", tiny_digits)
        patch.setattr(ttf, "LocalExecutor", lambda workers: LocalExecutor(0))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the runs were evaluated, so that metrics agree exactly
        yield
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StudySpec]:
    out = tmp_path_factory.mktemp("studies")
    specs = {task: _spec(task, out) for task in ("tiny-lorenz", "tiny-digits")}
    # The DoPr paper's protocol in small: a schedule, and a per-step EMA to export.
    specs["tiny-lorenz"] = replace(
        specs["tiny-lorenz"], transforms=("swa", "ema", "ens"), ema_decays=(0.9,),
        schedule="cosine", warmup=0.1,
    )  # fmt: skip
    specs["tiny-digits-ts"] = replace(
        specs["tiny-digits"], transforms=("swa", "ts", "ens"), metric="nll"
    )
    for spec in specs.values():
        run_study(spec, progress=False)
    return specs


def _spec(task: str, out: Path) -> StudySpec:
    return StudySpec(
        task=task,
        optimizers=("adamw", "dopr-adamw"),
        lrs=(1e-3, 1e-2),
        seeds=2,
        transforms=("swa", "ens"),
        out=out,
    )


@pytest.mark.parametrize("task", ["tiny-lorenz", "tiny-digits"])
def test_exported_models_reproduce_their_stored_test_metrics_exactly(
    task: str, studies: dict[str, StudySpec], tmp_path: Path
) -> None:
    spec = studies[task]
    emas = ("ema0.9", "ema0.9_ens") if "ema" in spec.transforms else ()
    for criterion in ("val_loss", "downstream", "swa", "ens", "swa_ens", *emas):
        path = tmp_path / f"{criterion}.pt"
        selected = export_model(spec, path, criterion)
        rebuilt_task, model, record = load_model(path)
        assert record["run_ids"] == list(selected.run_ids)
        assert isinstance(model, OutputEnsemble) == criterion.endswith("ens")
        assert len(selected.run_ids) == (2 if criterion.endswith("ens") else 1)
        metrics = rebuilt_task.evaluate(model, "test")
        assert metrics == selected.stored, criterion
    chosen = select_model(spec, "val_loss", optimizer="dopr-adamw")
    assert chosen.optimizer == "dopr-adamw" and chosen.metric == "val_loss"


def test_joint_selection_exports_the_model_the_report_names(
    studies: dict[str, StudySpec], tmp_path: Path
) -> None:
    """The best mean val metric over every (optimizer, lr, model), as the report's joint row."""
    spec = studies["tiny-lorenz"]
    result = run_study(spec, progress=False)
    models = ["", *(f"{name}_" for name in spec.evaluated)]
    options = [
        (summary.mean.get(f"{model}val_vpt", math.nan), summary, model)
        for summary in result.summaries
        for model in models
    ]
    _, summary, prefix = max((o for o in options if not math.isnan(o[0])), key=lambda o: o[0])
    selected = export_model(spec, tmp_path / "joint.pt", "joint")
    assert (selected.optimizer, selected.lr) == (summary.optimizer, summary.lr)
    assert selected.kind == (prefix.removesuffix("_") or "base")
    assert selected.metric == f"{prefix}val_vpt"
    task, model, _ = load_model(tmp_path / "joint.pt")
    assert task.evaluate(model, "test") == selected.stored
    [overall] = [row for row in result.tables["deploy"].splitlines() if "all optimizers" in row]
    assert f"| {summary.optimizer}, " in overall
    for optimizer in spec.optimizer_labels:
        assert select_model(spec, "joint", optimizer=optimizer).optimizer == optimizer


def test_temperature_scaled_models_export_with_their_temperatures_exactly(
    studies: dict[str, StudySpec], tmp_path: Path
) -> None:
    spec = studies["tiny-digits-ts"]
    assert spec.name == "ttf-tiny-digits-quick-swa+ts-by-nll-ens"
    scaled = ("ts", "swa_ts", "ens_ts", "swa_ens_ts")
    assert set(scaled) <= set(spec.evaluated)
    for criterion in scaled:
        path = tmp_path / f"{criterion}.pt"
        selected = export_model(spec, path, criterion)
        assert selected.metric == f"{criterion}_val_nll"
        rebuilt_task, model, _ = load_model(path)
        assert isinstance(model, TemperatureScaled)
        assert isinstance(model.model, OutputEnsemble) == ("ens" in criterion)
        assert rebuilt_task.evaluate(model, "test") == selected.stored, criterion
        if criterion in ("ts", "swa_ts"):
            stored_t = _final(spec, selected.run_ids[0], f"{criterion}_temperature")
            assert model.temperature.item() == stored_t


def test_temperature_scaling_changes_probabilities_not_decisions(
    studies: dict[str, StudySpec],
) -> None:
    spec = studies["tiny-digits-ts"]
    for key in spec.grid():
        run_id = spec.run_id(*key)
        for source in ("", "swa_"):
            error = _final(spec, run_id, f"{source}test_error")
            assert _final(spec, run_id, f"{source}ts_test_error") == error
            # T* minimises the val NLL, so the scaled model's val NLL is never worse.
            assert _final(spec, run_id, f"{source}ts_val_nll") <= _final(
                spec, run_id, f"{source}val_nll"
            ) + 1e-6
    # The composition of the post-hoc paper: TS per member, mean of logits, TS again.
    task = spec.make_task()
    members = [ttf.rebuild(ttf.run_job(spec, "adamw", 1e-3, s), "swa") for s in (0, 1)]
    scaled = [calibrated(task, m) for m in members]
    by_hand = calibrated(task, OutputEnsemble(scaled))
    stored = _final(spec, spec.ensemble_id("adamw", 1e-3), "swa_ens_ts_test_nll")
    assert task.evaluate(by_hand, "test")["nll"] == stored


def test_runs_register_their_checkpoints_and_a_changed_one_is_refused(
    studies: dict[str, StudySpec], tmp_path: Path
) -> None:
    from beyondloss.store import ResultsStore

    spec = studies["tiny-lorenz"]
    job = ttf.run_job(spec, "adamw", 1e-3, 0)
    with ResultsStore(spec.out / "beyondloss.db") as store:
        artifact = store.artifacts(job.run_id)["checkpoint"]
    assert artifact.path == (job.run_dir / "checkpoint.pt").resolve() and artifact.epoch == 3
    assert artifact.contents == (
        "model", "optimizer", "rng", "history", "evaluator:swa", "evaluator:ema0.9",
    )
    original = artifact.path.read_bytes()
    try:
        other = ttf.run_job(spec, "adamw", 1e-2, 0)
        artifact.path.write_bytes((other.run_dir / "checkpoint.pt").read_bytes())
        with pytest.raises(ValueError, match="changed since it was registered"):
            ttf.rebuild(job)
    finally:
        artifact.path.write_bytes(original)
    ttf.rebuild(job)


def test_selection_follows_the_study_and_the_seed_by_the_same_metric(
    studies: dict[str, StudySpec],
) -> None:
    spec = studies["tiny-lorenz"]
    result = run_study(spec, progress=False)
    assert result.trained == ()
    selected = select_model(spec, "downstream", optimizer="adamw")
    assert selected.lr == result.by_downstream["adamw"].lr
    finals = {
        seed: _final(spec, spec.run_id("adamw", selected.lr, seed), "val_vpt") for seed in (0, 1)
    }
    assert selected.run_ids == (spec.run_id("adamw", selected.lr, max(finals, key=finals.get)),)
    with pytest.raises(ValueError, match="unknown criterion 'ema'"):
        select_model(spec, "ema")
    with pytest.raises(ValueError, match="not complete"):
        select_model(replace(spec, seeds=3), "downstream")


def _final(spec: StudySpec, run_id: str, metric: str) -> float:
    from beyondloss.store import ResultsStore

    with ResultsStore(spec.out / "beyondloss.db") as store:
        return store.curves(run_id)[metric][-1]


def test_export_command_writes_and_checks_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ["--optimizers", "adamw", "--lrs", "1e-3", "--seeds", "2", "--out", str(tmp_path)]
    assert main(["ttf", "tiny-digits", *options, "--no-progress"]) == 0
    capsys.readouterr()
    output = tmp_path / "model.pt"
    assert main(["export", "tiny-digits", *options, "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "selected by val_error" in printed and "DIFFERS" not in printed
    assert "test clean_error: stored" in printed and output.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "tiny-digits", *options, "--select", "swa", "-o", str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2
    assert "unknown criterion 'swa'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_ensemble_rows_carry_the_settings_of_their_members(studies: dict[str, StudySpec]) -> None:
    """``beyondloss runs`` shows an ensemble with its members' axes, not NaN."""
    spec = studies["tiny-lorenz"]
    with ResultsStore(spec.out / "beyondloss.db", readonly=True) as store:
        frame = store.final_frame(task="tiny-lorenz")
    ensembles, members = frame[frame["seed"] == -1], frame[frame["seed"] >= 0]
    assert len(ensembles) == 4 and len(members) == 8
    for axis in ("size", "data_seed", "epochs", "batch_size", "transforms", "schedule", "warmup"):
        assert ensembles[axis].notna().all(), axis
        assert set(ensembles[axis]) == set(members[axis]), axis
    assert all(len(names.split(",")) == 2 for names in ensembles["members"])
