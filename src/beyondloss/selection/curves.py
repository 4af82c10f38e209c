"""Per-epoch metric curves of post-hoc transforms, computed from tracked logits.

Input: one :class:`~beyondloss.posthoc.tracker.PosthocLog` per run (runs differ by seed only,
share epochs and evaluation data). For a :class:`~beyondloss.posthoc.ensemble.Composition`
``c`` and epoch index ``t``:

* without ensembling, run ``r`` gives one point: ``c`` applied to run ``r``'s logits at
  ``t`` (temperatures fitted on that run's val logits at ``t``), so the curves are ``(R, E)``;
* with ensembling, all runs at ``t`` are the members: one point per epoch, curves ``(1, E)``.

Metric keys are ``"{split}_{metric}"`` (``"val_nll"``, ``"test_error"``, ...) and, where clean
labels are known, ``"{split}_clean_{metric}"``; metrics are those of
:func:`beyondloss.metrics.classification.classification_metrics`, all lower-is-better.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from beyondloss.metrics.classification import classification_metrics
from beyondloss.posthoc.ensemble import Composition
from beyondloss.posthoc.tracker import PosthocLog

Grid = Mapping[str, Sequence[PosthocLog]]
"""``{config name: runs}``; a single config is ``{"default": runs}``."""


@dataclass(frozen=True)
class Curves:
    """Metric curves of one transform: ``values[key]`` is ``(R, E)`` (``R = 1`` for ensembles)
    over the epochs ``epochs`` ``(E,)``."""

    transform: str
    epochs: np.ndarray
    values: Mapping[str, np.ndarray]

    def mean(self, key: str) -> np.ndarray:
        """Curve ``(E,)`` of ``key`` averaged over runs."""
        return self.values[key].mean(axis=0)


def check_runs(logs: Sequence[PosthocLog]) -> None:
    """Raise ``ValueError`` unless the runs share epochs, splits, kinds and labels."""
    if not logs:
        raise ValueError("need at least one run")
    first = logs[0]
    for i, log in enumerate(logs[1:], start=1):
        if log.epochs != first.epochs or log.kinds != first.kinds or log.splits != first.splits:
            raise ValueError(f"run {i} has other epochs, kinds or splits than run 0")
        for s in first.splits:
            if not torch.equal(log.labels(s), first.labels(s)):
                raise ValueError(f"run {i} has other {s} labels than run 0")


def apply_metrics(
    composition: Composition, log: PosthocLog, val_logits: Tensor, test_logits: Tensor
) -> dict[str, float]:
    """Metrics of ``composition`` applied to the given logits (shapes as in
    :meth:`Composition.apply`), with the labels of ``log``."""
    val, test = composition.apply(val_logits, log.labels("val"), test_logits)
    out: dict[str, float] = {}
    for split, z in (("val", val), ("test", test)):
        variants = [("", False)] + ([("_clean", True)] if log.has_clean(split) else [])
        for suffix, clean in variants:
            values = classification_metrics(z, log.labels(split, clean))
            out.update({f"{split}{suffix}_{m}": v for m, v in values.items()})
    return out


def _stack(rows: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def transform_curves(logs: Sequence[PosthocLog], composition: Composition) -> Curves:
    """Curves of ``composition`` over the runs ``logs`` (see the module docstring)."""
    check_runs(logs)
    n_epochs = len(logs[0].epochs)
    if composition.ensemble:
        rows = [ensemble_at(logs, composition, [t] * len(logs)) for t in range(n_epochs)]
        values = {k: v[None, :] for k, v in _stack(rows).items()}
    else:
        per_run = [
            _stack([_single_at(log, composition, t) for t in range(n_epochs)]) for log in logs
        ]
        values = {k: np.stack([r[k] for r in per_run]) for k in per_run[0]}
    return Curves(composition.name, np.array(logs[0].epochs), values)


def _single_at(log: PosthocLog, composition: Composition, index: int) -> dict[str, float]:
    val = log.logits_at(composition.source, "val", index)
    test = log.logits_at(composition.source, "test", index)
    return apply_metrics(composition, log, val, test)


def ensemble_at(
    logs: Sequence[PosthocLog], composition: Composition, indices: Sequence[int]
) -> dict[str, float]:
    """Metrics of the ensemble ``composition`` whose member ``r`` is run ``r`` at epoch index
    ``indices[r]`` (all equal along a curve; each run's own epoch under naive selection)."""
    if not composition.ensemble:
        raise ValueError(f"{composition.name} is not an ensemble")
    pairs = list(zip(logs, indices, strict=True))
    val = torch.stack([log.logits_at(composition.source, "val", i) for log, i in pairs])
    test = torch.stack([log.logits_at(composition.source, "test", i) for log, i in pairs])
    return apply_metrics(composition, logs[0], val, test)


class CurveBook:
    """Curves of every (config, transform) of a grid, each computed once when first asked."""

    def __init__(self, grid: Grid) -> None:
        if not grid:
            raise ValueError("the grid has no config")
        for runs in grid.values():
            check_runs(runs)
        self.grid = grid
        self._curves: dict[tuple[str, Composition], Curves] = {}

    def curves(self, config: str, composition: Composition) -> Curves:
        """Curves of ``composition`` over the runs of ``config``."""
        key = (config, composition)
        if key not in self._curves:
            self._curves[key] = transform_curves(self.grid[config], composition)
        return self._curves[key]
