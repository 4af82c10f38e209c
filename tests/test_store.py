"""Tests of the SQLite results store."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from beyondloss.store import Artifact, ResultsStore, RunRecord


def _add(store: ResultsStore, run_id: str, **overrides: object) -> bool:
    fields: dict[str, object] = {
        "task": "pendulum",
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "seed": 0,
        "config": {"epochs": 3, "hidden": [64, 64]},
    }
    fields.update(overrides)
    return store.add_run(run_id, **fields)  # type: ignore[arg-type]


def test_run_round_trip_decodes_config_and_starts_running(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.db") as store:
        assert _add(store, "a")
        (run,) = store.runs()
    assert run["run_id"] == "a"
    assert run["task"] == "pendulum" and run["optimizer"] == "adamw"
    assert run["lr"] == 1e-3 and run["weight_decay"] == 0.0 and run["seed"] == 0
    assert run["config"] == {"epochs": 3, "hidden": [64, 64]}
    assert run["status"] == "running"
    assert isinstance(run["created"], str)


def test_add_run_is_idempotent_but_rejects_conflicting_fields(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.db") as store:
        assert _add(store, "a")
        store.mark_complete("a")
        assert not _add(store, "a")
        assert store.is_complete("a")
        with pytest.raises(ValueError, match="different fields"):
            _add(store, "a", lr=2e-3)


def test_runs_filters_by_columns_and_rejects_unknown_names(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.db") as store:
        _add(store, "a", optimizer="adamw", seed=0)
        _add(store, "b", optimizer="sgd", seed=0)
        _add(store, "c", optimizer="sgd", seed=1)
        store.mark_complete("c")
        assert [r["run_id"] for r in store.runs(optimizer="sgd")] == ["b", "c"]
        assert [r["run_id"] for r in store.runs(optimizer="sgd", seed=0)] == ["b"]
        assert [r["run_id"] for r in store.runs(status="complete")] == ["c"]
        with pytest.raises(ValueError, match="unknown run filters"):
            store.runs(colour="red")


def test_curves_align_epochs_and_fill_missing_with_nan(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.db") as store:
        _add(store, "a")
        store.log_epoch("a", 2, {"train_loss": 0.5, "val_loss": 0.7})
        store.log_epoch("a", 1, {"train_loss": 1.0})
        curves = store.curves("a")
    assert curves["epoch"] == [1.0, 2.0]
    assert curves["train_loss"] == [1.0, 0.5]
    assert math.isnan(curves["val_loss"][0]) and curves["val_loss"][1] == 0.7


def test_relogging_an_epoch_replaces_values_instead_of_duplicating(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with ResultsStore(path) as store:
        _add(store, "a")
        store.log_epoch("a", 1, {"train_loss": 1.0, "val_loss": 2.0})
        store.log_epoch("a", 1, {"train_loss": 0.25, "val_loss": 0.5})
        assert store.curves("a") == {"epoch": [1.0], "train_loss": [0.25], "val_loss": [0.5]}
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM metrics").fetchone() == (2,)


def test_reopened_store_keeps_runs_metrics_and_status(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with ResultsStore(path) as store:
        _add(store, "a")
        store.log_epoch("a", 1, {"train_loss": 1.5})
        store.mark_complete("a")
    with ResultsStore(path) as store:
        assert store.is_complete("a")
        assert store.curves("a") == {"epoch": [1.0], "train_loss": [1.5]}
        assert not store.is_complete("missing")


def test_two_open_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with ResultsStore(path) as first, ResultsStore(path) as second:
        _add(first, "a")
        second.log_epoch("a", 1, {"train_loss": 1.0})
        first.log_epoch("a", 2, {"train_loss": 0.5})
        assert second.curves("a")["train_loss"] == [1.0, 0.5]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_unknown_run_and_reserved_name_are_rejected(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.db") as store:
        with pytest.raises(KeyError):
            store.log_epoch("missing", 1, {"train_loss": 1.0})
        with pytest.raises(KeyError):
            store.mark_complete("missing")
        with pytest.raises(KeyError):
            store.curves("missing")
        _add(store, "a")
        with pytest.raises(ValueError, match="reserved"):
            store.log_epoch("a", 1, {"epoch": 1.0})


def test_to_frame_is_long_format_joined_with_run_columns(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    with ResultsStore(tmp_path / "r.db") as store:
        _add(store, "a", optimizer="sgd")
        store.log_epoch("a", 1, {"train_loss": 1.0, "val_loss": 2.0})
        frame = store.to_frame()
    assert list(frame.columns) == [
        "run_id",
        "task",
        "optimizer",
        "lr",
        "weight_decay",
        "seed",
        "status",
        "config",
        "epoch",
        "name",
        "value",
    ]
    assert len(frame) == 2
    assert set(frame["optimizer"]) == {"sgd"}
    assert frame.set_index("name")["value"].to_dict() == {"train_loss": 1.0, "val_loss": 2.0}


def test_non_finite_metrics_round_trip(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "results.db") as store:
        store.add_run("r", task="t", optimizer="o", lr=0.1, weight_decay=0.0, seed=0)
        store.log_epoch("r", 1, {"val_loss": math.nan, "nrmse": math.inf, "vpt": 0.0})
        curves = store.curves("r")
    assert math.isnan(curves["val_loss"][0])
    assert curves["nrmse"] == [math.inf] and curves["vpt"] == [0.0]


def test_final_frame_has_every_config_axis_and_the_last_value_of_every_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from beyondloss.cli import main
    from beyondloss.store import flatten

    with ResultsStore(tmp_path / "beyondloss.db") as store:
        for seed, cov in ((0, 10), (1, 10), (2, 1)):
            run_id = f"r{seed}"
            store.add_run(
                run_id,
                task="t",
                optimizer="dopr-adamw",
                lr=1e-3,
                weight_decay=0.0,
                seed=seed,
                config={"study": "s", "dopr": {"cov_every": cov}, "transforms": ["swa", "ens"]},
            )
            store.log_epoch(run_id, 1, {"val_loss": 2.0, "test_vpt": float(seed)})
            store.log_epoch(run_id, 2, {"val_loss": 1.0 + seed})
        frame = store.final_frame(**{"dopr.cov_every": 10})
        assert list(frame["run_id"]) == ["r0", "r1"]
        assert list(frame["val_loss"]) == [1.0, 2.0] and list(frame["test_vpt"]) == [0.0, 1.0]
        assert set(frame["transforms"]) == {"swa,ens"} and set(frame["study"]) == {"s"}
        assert store.final_frame(**{"dopr.cov_every": 5}).empty
        with pytest.raises(ValueError, match=r"no run has the axes \['missing_axis'\]; the axes"):
            store.final_frame(missing_axis=1)
    assert flatten({"a": {"b": {"c": 1}}, "d": [1, 2]}) == {"a.b.c": 1, "d": "1,2"}
    assert (
        main(
            [
                "runs",
                "--out",
                str(tmp_path),
                "--where",
                "dopr.cov_every=1",
                "--csv",
                "--metrics",
                "val_loss",
                "--columns",
                "run_id,seed",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "run_id,seed,val_loss\nr2,2,3.0\n\n"
    with pytest.raises(SystemExit):
        main(["runs", "--out", str(tmp_path), "--where", "cov_every"])
    assert "--where takes AXIS=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["runs", "--out", str(tmp_path), "--where", "foo=bar"])
    assert "no run has the axes ['foo']; the axes are created, dopr.cov_every" in (
        capsys.readouterr().err
    )


def test_artifacts_are_registered_relative_to_the_store_and_verified(tmp_path: Path) -> None:
    study = tmp_path / "study"
    (study / "runs").mkdir(parents=True)
    checkpoint = study / "runs" / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"logits")
    with ResultsStore(study / "r.db") as store:
        _add(store, "a")
        store.add_artifact("a", "checkpoint", checkpoint, epoch=3, contents=["model"])
        store.add_artifact("a", "logits", outside, epoch=3)
        with pytest.raises(KeyError):
            store.add_artifact("nope", "checkpoint", checkpoint, epoch=3)
        with pytest.raises(FileNotFoundError):
            store.add_artifact("a", "x", study / "missing.pt", epoch=3)
        stored = sqlite3.connect(store.path).execute("SELECT name, path FROM artifacts").fetchall()
        assert stored == [("checkpoint", "runs/checkpoint.pt"), ("logits", str(outside))]
    moved = tmp_path / "moved"
    study.rename(moved)  # a study folder moved as a whole keeps its artifacts
    with ResultsStore(moved / "r.db") as store:
        artifact = store.artifacts("a")["checkpoint"]
        assert store.artifacts("unknown") == {}
    assert artifact.path == moved / "runs" / "checkpoint.pt"
    assert (artifact.epoch, artifact.bytes, artifact.contents) == (3, 7, ("model",))
    artifact.verify()
    artifact.path.write_bytes(b"weightz")
    with pytest.raises(ValueError, match="changed since it was registered"):
        artifact.verify()
    artifact.path.unlink()
    with pytest.raises(FileNotFoundError, match="artifact checkpoint is missing"):
        artifact.verify()


def test_record_writes_a_finished_run_whole_and_again_the_same(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    run = RunRecord(
        "r", task="t", optimizer="adamw", lr=1e-3, weight_decay=0.0, seed=0, config={"a": 1},
        epochs=((1, {"val_loss": 2.0}), (2, {"val_loss": 1.0})),
        artifacts=(Artifact.of("checkpoint", checkpoint, 2, ["model"]),),
    )
    with ResultsStore(tmp_path / "s.db") as store:
        store.add_run("r", task="t", optimizer="adamw", lr=1e-3, weight_decay=0.0, seed=0,
                      config={"a": 1})
        store.log_epoch("r", 3, {"val_loss": 9.0})  # a stale row of an earlier attempt
        store.record(run)
        first = (store.curves("r"), store.artifacts("r"), store.is_complete("r"))
        store.record(run)
        assert (store.curves("r"), store.artifacts("r"), store.is_complete("r")) == first
        assert first[0] == {"epoch": [1, 2], "val_loss": [2.0, 1.0]} and first[2]
        assert first[1]["checkpoint"].path == checkpoint.resolve()
        with pytest.raises(ValueError, match="already exists with different fields"):
            store.record(replace(run, seed=1))
        assert store.curves("r") == first[0]  # the failed record changed nothing
