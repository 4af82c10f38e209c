"""Checkpoint choice within a run: the epoch a model's own validation metric selects.

Beside the final epoch, a run offers every evaluated epoch as a checkpoint. For one model kind
of the run (the base model, prefix ``""``, or a transform, prefix ``"swa_"``, ``"ema0.999_"``)
and downstream metric ``m``, with ``E`` the epochs where ``{prefix}val_m`` was evaluated:

    e* = argbest_{e ∈ E} {prefix}val_m[e]        (the earliest epoch on ties)
    {prefix}val_m@best    = {prefix}val_m[e*]
    {prefix}test_m@best   = {prefix}test_m[e*]   (what deploying the selected checkpoint gives)
    {prefix}epoch@best    = e*
    {prefix}test_m@oracle = best_{e ∈ E} {prefix}test_m[e]   (the test oracle: not a choice a
                                                             user can make; an upper bound)

A run whose validation metric is never finite gets NaN for all four.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def best_epoch_metrics(
    curves: Mapping[str, Sequence[float]],
    prefixes: Sequence[str],
    metric: str,
    higher_is_better: bool,
) -> dict[str, float]:
    """The four values of the module docstring for each of ``prefixes``, from one run's
    ``curves`` (``{name: per-epoch values}``, ``"epoch"`` among them; NaN where not evaluated)."""
    epochs = curves["epoch"]
    out: dict[str, float] = {}
    for prefix in prefixes:
        val = curves.get(f"{prefix}val_{metric}", [])
        test = curves.get(f"{prefix}test_{metric}", [math.nan] * len(val))
        sign = 1.0 if higher_is_better else -1.0
        evaluated = [i for i, v in enumerate(val) if math.isfinite(v)]
        names = [f"{prefix}val_{metric}@best", f"{prefix}test_{metric}@best",
                 f"{prefix}epoch@best", f"{prefix}test_{metric}@oracle"]  # fmt: skip
        if not evaluated:
            out |= dict.fromkeys(names, math.nan)
            continue
        chosen = max(evaluated, key=lambda i: (sign * val[i], -i))
        tests = [test[i] for i in evaluated if math.isfinite(test[i])]
        oracle = (max if higher_is_better else min)(tests) if tests else math.nan
        values = [val[chosen], test[chosen], float(epochs[chosen]), oracle]
        out |= dict(zip(names, values, strict=True))
    return out
