"""Faults a user meets at the command line, each answered by one line and a non-zero exit with
nothing written or corrupted: a store that is not SQLite, a read-only store or folder, ``--out``
naming a file, ``export`` on an empty folder, a grid too large to build, and Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from beyondloss.cli import main
from beyondloss.store import STORE_NAME, ResultsStore, StoreError, check_output_folder

BEYONDLOSS = [sys.executable, "-m", "beyondloss"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_line(capsys: pytest.CaptureFixture[str], start: str) -> str:
    error = capsys.readouterr().err
    assert error.startswith(start) and error.count("\n") == 1, error
    return error


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (Linux ``/proc``)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _store_with_a_run(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with ResultsStore(folder / STORE_NAME) as store:
        store.add_run(
            "r0", task="lorenz", optimizer="adamw", lr=1e-3, weight_decay=0.0, seed=0,
            config={"study": "s"},
        )  # fmt: skip
        store.log_epoch("r0", 1, {"val_loss": 0.5})
    return folder / STORE_NAME


@pytest.fixture
def read_only() -> Iterator:
    """Make paths read-only, even for root (``chattr +i``; skipped where that is not allowed)."""
    frozen: list[Path] = []

    def freeze(*paths: Path) -> None:
        for path in paths:
            if os.geteuid() != 0:
                path.chmod(0o555 if path.is_dir() else 0o444)
            elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                pytest.skip("cannot make a file read-only here (chattr +i refused)")
            frozen.append(path)

    yield freeze
    for path in reversed(frozen):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_file_that_is_not_sqlite_is_named_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / STORE_NAME).write_text("my notes\n")
    before = _tree(tmp_path)
    for argv in (
        ["runs"],
        ["study", "lorenz", "--size", "quick"],
        ["export", "lorenz", "--size", "quick", "-o", str(tmp_path / "model.pt")],
    ):
        assert main([*argv, "--out", str(tmp_path)]) == 1
        error = _one_line(capsys, f"beyondloss {argv[0]}: ")
        assert "is not a results store (not an SQLite database)" in error
    assert _tree(tmp_path) == before


def test_runs_reads_a_read_only_store_and_study_refuses_to_write_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only
) -> None:
    database = _store_with_a_run(tmp_path / "out")
    read_only(database, database.parent)
    before = _tree(database.parent)
    assert main(["runs", "--out", str(database.parent), "--metrics", "val_loss"]) == 0
    assert "r0" in capsys.readouterr().out
    assert main(["study", "lorenz", "--size", "quick", "--out", str(database.parent)]) == 1
    _one_line(capsys, "beyondloss study: cannot write to the output folder")
    assert _tree(database.parent) == before


def test_a_read_only_store_in_a_writable_folder_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only
) -> None:
    database = _store_with_a_run(tmp_path)
    read_only(database)
    before = _tree(tmp_path)
    assert main(["study", "lorenz", "--size", "quick", "--out", str(tmp_path)]) == 1
    error = _one_line(capsys, "beyondloss study: cannot write the results store")
    assert error.endswith("it is read-only\n")
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [STORE_NAME]


def test_out_naming_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    assert main(["study", "lorenz", "--size", "quick", "--out", str(notes)]) == 1
    _one_line(capsys, f"beyondloss study: output folder {notes} is a file, not a folder")
    with pytest.raises(StoreError, match="notes.txt is a file"):
        check_output_folder(notes / "below")
    assert notes.read_text() == "keep me\n" and _tree(tmp_path) == {"notes.txt": b"keep me\n"}


def test_export_and_runs_on_an_empty_folder_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.pt"
    assert main(["export", "lorenz", "--size", "quick", "--out", str(tmp_path), "-o", str(model)])
    _one_line(capsys, f"beyondloss export: no results store at {tmp_path / STORE_NAME}")
    assert main(["runs", "--out", str(tmp_path)]) == 1
    _one_line(capsys, "beyondloss runs: no results store at")
    assert list(tmp_path.iterdir()) == []


def test_a_grid_too_large_to_build_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "lorenz", "--seeds", "1000000000", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and time.perf_counter() - began < 5
    assert "the grid has 12,000,000,000 runs (optimizers × lrs × seeds), more than the 100,000" in (
        capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_a_study_and_its_workers_at_once_with_one_line(tmp_path: Path) -> None:
    """SIGINT to the process group, as a terminal's Ctrl-C sends it, while the workers train."""
    out = tmp_path / "out"
    argv = [*BEYONDLOSS, "study", "lorenz", "--size", "quick", "--optimizers", "adamw"]
    argv += ["--lrs", "1e-3", "--seeds", "2", "--no-progress", "--out", str(out)]
    study = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    runs = out / "ttf-lorenz-quick" / "runs"
    deadline = time.monotonic() + 120
    while not (runs.is_dir() and any(runs.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.2)  # a worker has started its run
    assert study.poll() is None, "the study ended before it could be interrupted"
    began = time.monotonic()
    os.killpg(study.pid, signal.SIGINT)
    _, error = study.communicate(timeout=60)
    assert time.monotonic() - began < 10
    assert study.returncode == 130
    assert error.count("\n") == 1 and error.startswith("beyondloss study: interrupted; ")
    assert error.endswith(" runs stored; rerun to resume\n")
    deadline = time.monotonic() + 10
    while _group(study.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group(study.pid) == [], "a worker outlived the interrupted study"
    with ResultsStore(out / STORE_NAME, readonly=True) as store:
        assert len(store.runs()) <= 2  # what was stored is intact and readable
    shutil.rmtree(out)
