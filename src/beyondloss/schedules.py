"""Learning-rate schedules of the training loop: constant, warmup + cosine decay, warmup + linear
decay, stepped once per optimizer step.

With ``T`` optimizer steps in the run, ``W = round(warmup · T)`` warmup steps and ``s`` the
0-based index of the step about to be taken, every parameter group's learning rate is its base
rate ``η`` times

    warmup (s < W):         (s + 1) / W
    then, p = (s − W) / (T − W) ∈ [0, 1):
        constant:           1
        cosine:             (1 + cos(π p)) / 2
        linear:             1 − p

so the first step is taken at ``η / W`` (at ``η`` without warmup), step ``W`` at ``η``, and no
step at a zero rate (the last decayed step is at ``η / (T − W)`` for linear decay).
The schedule is :class:`torch.optim.lr_scheduler.LambdaLR` over :class:`LrMultiplier`, a plain
picklable object, so the scheduler's ``state_dict`` round-trips through a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "cosine", "linear")
"""Names of the schedules (:class:`LrMultiplier`)."""


def check_schedule(schedule: str, warmup: float) -> None:
    """``ValueError`` naming the bad value unless ``schedule`` is one of :data:`SCHEDULES` and
    ``warmup`` (a fraction of the run's steps) lies in ``[0, 1)``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if isinstance(warmup, bool) or not (
        isinstance(warmup, int | float) and math.isfinite(warmup) and 0.0 <= warmup < 1.0
    ):
        raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {warmup!r}")


@dataclass(frozen=True)
class LrMultiplier:
    """The factor on the base learning rate at step ``s`` (module docstring)."""

    schedule: str
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        check_schedule(self.schedule, 0.0)
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps < total_steps, got {self.warmup_steps} and "
                f"{self.total_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "linear":
            return 1.0 - progress
        return 1.0


def make_scheduler(
    optimizer: Optimizer, schedule: str, warmup: float, total_steps: int
) -> LambdaLR:
    """The :class:`LambdaLR` of ``schedule`` with ``round(warmup · total_steps)`` warmup steps
    (at most ``total_steps − 1``); it sets the rate of the first step at once."""
    check_schedule(schedule, warmup)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(round(warmup * total_steps), total_steps - 1)
    return LambdaLR(optimizer, LrMultiplier(schedule, warmup_steps, total_steps))
