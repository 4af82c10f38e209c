"""A small study run as its own process (``python tests/study_driver.py OUT EXECUTOR``), so that
a test can SIGKILL the driver of a study and restart it: 2 optimizers x 2 seeds of a 3-epoch
Lorenz task, 2 workers."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from beyondloss.study import StudySpec, run_study
from beyondloss.tasks import TASKS
from beyondloss.tasks.dynamics import Lorenz63Task, LorenzConfig


def tiny_lorenz(size: str, data_seed: int) -> Lorenz63Task:
    config = replace(
        LorenzConfig.quick(data_seed), epochs=3, train_steps=300, n_rollouts=10, horizon_lt=2.0
    )
    return Lorenz63Task(config)


def spec(out: Path, executor: str) -> StudySpec:
    return StudySpec(
        "tiny-lorenz",
        optimizers=("adamw", "dopr-adamw"),
        lrs=(1e-3,),
        seeds=2,
        transforms=("swa", "ens"),
        workers=2,
        out=out,
        executor=executor,
    )


if __name__ == "__main__":
    TASKS["tiny-lorenz"] = tiny_lorenz
    run_study(spec(Path(sys.argv[1]), sys.argv[2]), progress=False)
