"""Runs as Ray tasks: the same results as the local pool, and a worker killed mid-run is retried
and resumes from its checkpoint, leaving the store as an undisturbed study leaves it."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from beyondloss.study import StudySpec, run_study  # noqa: E402
from beyondloss.study.ray_executor import RayExecutor  # noqa: E402
from beyondloss.study.ttf import _executor  # noqa: E402
from beyondloss.tasks import TASKS  # noqa: E402
from beyondloss.tasks.dynamics import Lorenz63Task, LorenzConfig  # noqa: E402

# The tasks below live in this test module, which Ray workers cannot import: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def busy(seconds: float) -> float:
    """Busy for ``seconds`` in short sleeps (a cancel interrupts Python code between them)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return seconds


def tiny_lorenz(size: str, data_seed: int) -> Lorenz63Task:
    config = replace(
        LorenzConfig.quick(data_seed), epochs=3, train_steps=300, n_rollouts=10, horizon_lt=2.0
    )
    return Lorenz63Task(config)


class KilledOnce(Lorenz63Task):
    """Lorenz whose worker SIGKILLs itself in an evaluation after the run's first checkpoint,
    once (while ``marker`` does not exist): a worker process dying mid-run."""

    marker: Path

    def evaluate(self, model, split="test", primary_only=False):  # type: ignore[no-untyped-def]
        started = any(self.marker.parent.glob("**/checkpoint.pt"))
        if started and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().evaluate(model, split, primary_only)


def killed_once(size: str, data_seed: int, marker: Path) -> Lorenz63Task:
    killing = KilledOnce(tiny_lorenz(size, data_seed).config)
    killing.marker = marker
    return killing


@pytest.fixture(scope="module")
def cluster() -> RayExecutor:
    executor = RayExecutor(num_cpus=2)
    with executor:
        yield executor


def test_results_come_back_in_call_order_and_failures_are_named(cluster: RayExecutor) -> None:
    calls = [(square, x) for x in range(5)]
    assert cluster.run(calls, [str(x) for x in range(5)], "squares", progress=False) == [
        0, 1, 4, 9, 16
    ]
    with pytest.raises(RuntimeError, match="squares three failed: .*bad 3"):
        cluster.run([(square, 1), (fail, 3)], ["one", "three"], "squares", progress=False)
    # A failure cancels the unfinished calls (here one busy for a minute, which would otherwise
    # hold one of the two CPUs), and many failures in a row leave the driver alive: Ray 2.60
    # aborted the driver now and then when a call finishing was force-cancelled.
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="busy three failed"):
        cluster.run([(busy, 60.0), (fail, 3)], ["one", "three"], "busy", progress=False)
    for _ in range(30):
        with pytest.raises(RuntimeError, match="squares three failed"):
            cluster.run([(square, 1), (fail, 3)], ["one", "three"], "squares", progress=False)
    assert cluster.run([(busy, 0.1), (busy, 0.1)], ["a", "b"], "busy", progress=False) == [0.1] * 2
    assert time.monotonic() - began < 30
    with pytest.raises(ValueError, match="cpus_per_run must be >= 1"):
        RayExecutor(cpus_per_run=0)
    # A DDP run's task asks Ray for one CPU per rank.
    ddp_spec = StudySpec("lorenz", executor="ray", ddp=2)
    assert _executor(ddp_spec, 3).cpus_per_run == 2
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        StudySpec("lorenz", executor="dask")


def _metrics(out: Path) -> list[tuple]:
    """Every stored metric but the wall times (which no two runs share)."""
    with sqlite3.connect(out / "beyondloss.db") as db:
        return sorted(
            db.execute(
                "SELECT run_id, epoch, name, value FROM metrics WHERE name != 'epoch_seconds'"
            ).fetchall()
        )


def test_ray_and_local_studies_store_identical_metrics_even_when_a_worker_dies(
    cluster: RayExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(TASKS, "tiny-lorenz", tiny_lorenz)
    marker = tmp_path / "killed" / "marker"
    marker.parent.mkdir()
    monkeypatch.setitem(TASKS, "killed-lorenz", partial(killed_once, marker=marker))
    grid = {"optimizers": ("adamw", "dopr-adamw"), "lrs": (1e-3,), "seeds": 2, "workers": 2}
    local = StudySpec("tiny-lorenz", out=tmp_path / "local", **grid)
    on_ray = replace(local, out=tmp_path / "ray", executor="ray")
    run_study(local, progress=False)
    run_study(on_ray, progress=False)
    assert _metrics(local.out) == _metrics(on_ray.out) != []
    # One run's worker is SIGKILLed at epoch 2: Ray retries it, the run resumes from its epoch-1
    # checkpoint, and the store ends as the undisturbed one (run ids differ by the task name).
    killed = replace(on_ray, task="killed-lorenz", out=marker.parent, seeds=1)
    result = run_study(killed, progress=False)
    assert marker.exists() and result.trained
    clean = replace(local, seeds=1, out=tmp_path / "clean")
    run_study(clean, progress=False)
    renamed = [
        (run_id.replace("killed-lorenz", "tiny-lorenz"), *rest)
        for run_id, *rest in _metrics(killed.out)
    ]
    assert renamed == _metrics(clean.out)


def test_an_outside_task_and_optimizer_run_on_ray(
    cluster: RayExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tutorial's task and optimizer, by file reference: Ray workers resolve them."""
    examples = Path(__file__).parents[1] / "docs" / "examples"
    for name in ("my_task.py", "my_optimizer.py"):
        shutil.copy(examples / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    spec = StudySpec(
        "my_task.py:make_task",
        optimizers=("nesterov=my_optimizer.py:make_nesterov",),
        lrs=(1e-2,),
        seeds=2,
        executor="ray",
        out=tmp_path / "ray",
    )
    result = run_study(spec, progress=False)
    assert len(result.trained) == 2
    [summary] = result.summaries
    assert summary.optimizer == "nesterov" and summary.mean["test_steps_in_tolerance"] > 0
