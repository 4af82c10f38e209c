"""A study whose driver is SIGKILLed mid-study and restarted ends with the store an undisturbed
study leaves: every run once, complete, with the clean study's metrics and verified checkpoints.

The driver is the store's one writer: it records each run in one transaction when its worker
returns it, so a kill loses only the runs in flight, which resume from their checkpoints."""

from __future__ import annotations

import importlib.util
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beyondloss.store import ResultsStore

DRIVER = Path(__file__).with_name("study_driver.py")


def _study(out: Path, executor: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DRIVER), str(out), executor])


def _complete(out: Path) -> int:
    """Runs the store at ``out`` marks complete (0 before it exists, and while the driver has
    created the database file but not yet its tables)."""
    if not (out / "beyondloss.db").exists():
        return 0
    with sqlite3.connect(out / "beyondloss.db", timeout=30) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
            return 0
        return db.execute("SELECT count(*) FROM runs WHERE status = 'complete'").fetchone()[0]


def _rows(out: Path) -> dict[str, list[tuple]]:
    """The store's runs (id, status, config), metrics without wall times, and artifacts
    (name, epoch, contents). Not an artifact's size and SHA-256: its checkpoint holds wall
    times, and a resumed run pickles equal objects that a fresh one shares (its size moves by
    a few bytes); the test checks instead that each file is the one registered."""
    with sqlite3.connect(out / "beyondloss.db") as db:
        return {
            "runs": sorted(db.execute("SELECT run_id, status, config FROM runs").fetchall()),
            "metrics": sorted(
                db.execute(
                    "SELECT run_id, epoch, name, value FROM metrics"
                    " WHERE name != 'epoch_seconds'"
                ).fetchall()
            ),
            "artifacts": sorted(
                db.execute("SELECT run_id, name, epoch, contents FROM artifacts")
            ),
        }


@pytest.mark.parametrize(
    "executor",
    [
        "local",
        pytest.param(
            "ray",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("ray") is None, reason="needs the ray extra"
            ),
        ),
    ],
)
def test_a_driver_killed_mid_study_and_restarted_ends_with_the_clean_store(
    tmp_path: Path, executor: str
) -> None:
    killed = tmp_path / "killed"
    driver = _study(killed, executor)
    # Kill once a run is stored and another has a checkpoint but is not stored: mid-study.
    deadline = time.monotonic() + 300
    while driver.poll() is None and time.monotonic() < deadline:
        checkpoints = len(list(killed.glob("*/runs/*/checkpoint.pt")))
        stored = _complete(killed)
        if stored >= 1 and checkpoints > stored:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the study ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert 1 <= _complete(killed) < 6  # 4 runs and 2 ensembles
    time.sleep(1)  # an orphaned worker, if one survived, would now write over a checkpoint
    subprocess.run([sys.executable, str(DRIVER), str(killed), executor], check=True)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, str(DRIVER), str(clean), executor], check=True)
    assert _rows(killed) == _rows(clean)
    assert len(_rows(clean)["runs"]) == 6 and len(_rows(clean)["artifacts"]) == 4
    with ResultsStore(killed / "beyondloss.db") as store:
        for run in store.runs():
            for artifact in store.artifacts(run["run_id"]).values():
                artifact.verify()  # the file is the one the run's metrics came from
