"""Naive versus post-hoc selection of epochs and hyperparameters (Ranjan et al., 2024).

Input: a grid ``{config: runs}``, each run a :class:`~beyondloss.posthoc.tracker.PosthocLog`
(runs of one config differ by seed only), and the transforms
(:class:`~beyondloss.posthoc.ensemble.Composition`). ``m`` is the selection metric on val
(observed labels), lower is better; ``c`` a transform; ``R`` the runs of a config.

**Naive selection** decides on the base model only, then applies the transform there:

* run ``r`` of config ``g`` is taken at ``t_r = argmin_t base_val_m[g, r, t]``;
* the config is ``argmin_g mean_r base_val_m[g, r, t_r]``;
* single-model transform: test metric ``mean_r c_test[g, r, t_r]``;
  ensemble: the members are the runs, each at its own ``t_r``.

**Post-hoc selection** decides on the transformed model's val metric:

* single-model: ``t_r = argmin_t c_val_m[g, r, t]``, config ``argmin_g mean_r c_val_m[g, r, t_r]``,
  test metric ``mean_r c_test[g, r, t_r]``;
* ensemble: one shared epoch ``t = argmin_t c_val_m[g, t]``, config ``argmin_g c_val_m[g, t]``.

Ties go to the earliest epoch and the first config. The gain of a test metric is
``naive − post-hoc`` (positive: post-hoc selection is better).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from beyondloss.posthoc.ensemble import Composition, standard_compositions
from beyondloss.posthoc.tracker import PosthocLog
from beyondloss.selection.curves import CurveBook, Curves, Grid, ensemble_at
from beyondloss.selection.reversal import first_argmin, reversal_report

BASE = Composition("base")
"""The untransformed model, whose val curves drive naive selection."""


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection rule for one transform."""

    config: str
    indices: tuple[int, ...]
    """Epoch index per run (``R`` entries; all equal for a post-hoc selected ensemble)."""
    epochs: tuple[int, ...]
    """The same as epoch numbers."""
    score: float
    """The val criterion that chose the config (base metric for naive selection)."""
    test: Mapping[str, float]
    """Test metrics ``{"test_error": ..., "test_clean_nll": ..., ...}`` of the selected model."""


@dataclass(frozen=True)
class Choice:
    """What a selection rule picks from val curves: a config, an epoch index per curve row."""

    config: str
    indices: tuple[int, ...]
    score: float
    """Mean over rows of each row's minimum: the criterion that ranked the configs."""


def per_run_best(val: ArrayLike) -> tuple[tuple[int, ...], float]:
    """First-argmin epoch index of each row of ``val`` ``(R, E)`` and the mean of the minima."""
    rows = np.atleast_2d(np.asarray(val, dtype=np.float64))
    indices = tuple(first_argmin(row) for row in rows)
    return indices, float(np.mean([row[i] for row, i in zip(rows, indices, strict=True)]))


def choose(val: Mapping[str, ArrayLike]) -> Choice:
    """Pick from val curves ``{config: (R, E)}`` (lower is better): each row's first-argmin
    epoch, and the config with the lowest mean of its rows' minima (first one on ties).

    Naive selection calls it with the base model's curves, post-hoc selection with the
    transformed model's (``R = 1`` for an ensemble: one shared epoch)."""
    if not val:
        raise ValueError("no config to choose from")
    best = {g: per_run_best(v) for g, v in val.items()}
    config = min(best, key=lambda g: best[g][1])
    return Choice(config, *best[config])


def _test_at(curves: Curves, indices: Sequence[int]) -> dict[str, float]:
    """Mean over rows of each test curve at the rows' ``indices``."""
    return {
        k: float(np.mean([row[i] for row, i in zip(v, indices, strict=True)]))
        for k, v in curves.values.items()
        if k.startswith("test")
    }


def naive_selection(book: CurveBook, composition: Composition, metric: str = "nll") -> Selection:
    """Epochs and config by the base model's val ``metric``, transform applied there."""
    choice = choose({g: book.curves(g, BASE).values[f"val_{metric}"] for g in book.grid})
    config, indices = choice.config, choice.indices
    runs = book.grid[config]
    if composition.ensemble:
        metrics = ensemble_at(runs, composition, indices)
        test = {k: v for k, v in metrics.items() if k.startswith("test")}
    else:
        test = _test_at(book.curves(config, composition), indices)
    return Selection(config, indices, _epochs(runs, indices), choice.score, test)


def posthoc_selection(book: CurveBook, composition: Composition, metric: str = "nll") -> Selection:
    """Epochs and config by the transformed model's val ``metric``."""
    choice = choose({g: book.curves(g, composition).values[f"val_{metric}"] for g in book.grid})
    config, indices = choice.config, choice.indices
    test = _test_at(book.curves(config, composition), indices)
    runs = book.grid[config]
    shared = indices * len(runs) if composition.ensemble else indices
    return Selection(config, shared, _epochs(runs, shared), choice.score, test)


def _epochs(runs: Sequence[PosthocLog], indices: Sequence[int]) -> tuple[int, ...]:
    return tuple(runs[0].epochs[i] for i in indices)


def _as_grid(runs: Sequence[PosthocLog] | Grid) -> Grid:
    return runs if isinstance(runs, Mapping) else {"default": runs}


def compare_selection(
    runs: Sequence[PosthocLog] | Grid,
    compositions: Sequence[Composition] | None = None,
    metric: str = "nll",
    book: CurveBook | None = None,
) -> list[dict[str, Any]]:
    """Test metrics of each transform under naive and post-hoc selection, with the gain.

    ``runs`` is one config's runs or a grid ``{config: runs}``; ``compositions`` defaults to
    :func:`~beyondloss.posthoc.ensemble.standard_compositions` over the kinds tracked in the
    runs (ensembles only with more than one run). One row per transform::

        transform, metric, config_naive, config_posthoc, epochs_naive, epochs_posthoc,
        {test key}_naive, {test key}_posthoc, {test key}_gain   (gain = naive − post-hoc)

    Pass ``book`` (built on the same grid) to reuse curves already computed, e.g. by
    :func:`config_reversal`.
    """
    grid = _as_grid(runs)
    book = CurveBook(grid) if book is None else book
    if compositions is None:
        first = next(iter(grid.values()))
        compositions = standard_compositions(first[0].kinds, ensemble=len(first) > 1)
    rows = []
    for c in compositions:
        naive = naive_selection(book, c, metric)
        post = posthoc_selection(book, c, metric)
        row: dict[str, Any] = {
            "transform": c.name,
            "metric": metric,
            "config_naive": naive.config,
            "config_posthoc": post.config,
            "epochs_naive": naive.epochs,
            "epochs_posthoc": post.epochs,
        }
        for key in naive.test:
            row[f"{key}_naive"] = naive.test[key]
            row[f"{key}_posthoc"] = post.test[key]
            row[f"{key}_gain"] = naive.test[key] - post.test[key]
        rows.append(row)
    return rows


def config_reversal(
    book: CurveBook, composition: Composition, metric: str = "nll", tol: float = 0.0
) -> dict[str, Any]:
    """Reversal over configs: each config scored by its naive (base) and its post-hoc val
    criterion, as defined in the module docstring; a row of
    :meth:`~beyondloss.selection.reversal.ReversalReport.as_row` plus the transform."""
    configs = list(book.grid)
    base = [per_run_best(book.curves(g, BASE).values[f"val_{metric}"])[1] for g in configs]
    post = [per_run_best(book.curves(g, composition).values[f"val_{metric}"])[1] for g in configs]
    report = reversal_report(base, post, configs, tol)
    return {"transform": composition.name, "metric": f"val_{metric}"} | report.as_row()
