"""Post-hoc reversal and loss–error mismatch, measured on metric curves (numbers, not plots).

Curves are 1-d arrays over candidates ``k = 0..K-1`` (epochs, or hyperparameter configs),
lower is better; ``labels[k]`` names candidate ``k`` (its epoch or config).

**Reversal.** With base metric ``b`` (the model as trained) and post-hoc metric ``p`` (after a
transform), candidates ``i < j`` are a reversed pair when their order flips decisively:

    (b_i − b_j) · (p_i − p_j) < 0,   |b_i − b_j| > tol,   |p_i − p_j| > tol.

The size of a reversed pair is ``min(|b_i − b_j|, |p_i − p_j|)``: a reversal is only as large as
the weaker of the two disagreeing orders. The headline is the pair (argmin b, argmin p): naive
selection picks ``argmin b``, post-hoc selection ``argmin p``, and
``regret = p[argmin b] − min p ≥ 0`` is what naive selection loses in the post-hoc metric.

**Loss–error mismatch** of one model's curves (NLL ``ℓ``, error ``e`` over epochs): with
``t_ℓ = argmin ℓ`` and ``t_e = argmin e`` (first minima), the curves mismatch when the error
keeps falling after the NLL has started to rise:

    t_e > t_ℓ,   nll_rise = ℓ[t_e] − ℓ[t_ℓ] > tol,   error_drop = e[t_ℓ] − e[t_e] > tol.

Also counted: the steps ``t−1 → t`` after ``t_ℓ`` on which the NLL rises while the error falls.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from beyondloss.selection.curves import Curves


def first_argmin(curve: ArrayLike) -> int:
    """Index of the first minimum of a 1-d curve; NaN counts as +inf."""
    values = np.asarray(curve, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1-d curve, got shape {values.shape}")
    return int(np.argmin(np.where(np.isnan(values), np.inf, values)))


def _labels(labels: Sequence[Hashable] | None, size: int) -> list[Hashable]:
    if labels is None:
        return list(range(size))
    if len(labels) != size:
        raise ValueError(f"need {size} labels, got {len(labels)}")
    return list(labels)


@dataclass(frozen=True)
class ReversedPair:
    """Candidates ``first < second`` whose base and post-hoc orders disagree."""

    first: Hashable
    second: Hashable
    base_delta: float
    """``b[second] − b[first]``."""
    posthoc_delta: float
    """``p[second] − p[first]`` (opposite sign to ``base_delta``)."""

    @property
    def size(self) -> float:
        """``min(|base_delta|, |posthoc_delta|)``."""
        return min(abs(self.base_delta), abs(self.posthoc_delta))


@dataclass(frozen=True)
class ReversalReport:
    """Reversal between a base curve and a post-hoc curve; see the module docstring."""

    n_pairs: int
    n_reversed: int
    largest: ReversedPair | None
    base_best: Hashable
    posthoc_best: Hashable
    posthoc_at_base_best: float
    posthoc_min: float

    @property
    def regret(self) -> float:
        """``p[argmin b] − min p``: post-hoc metric lost by selecting on the base metric."""
        return self.posthoc_at_base_best - self.posthoc_min

    @property
    def reversed_fraction(self) -> float:
        """Fraction of candidate pairs that are reversed (0 with fewer than two candidates)."""
        return self.n_reversed / self.n_pairs if self.n_pairs else 0.0

    def as_row(self) -> dict[str, Any]:
        """Flat dict for a table row."""
        return {
            "n_reversed": self.n_reversed,
            "reversed_fraction": self.reversed_fraction,
            "largest_reversal": None if self.largest is None else self.largest.size,
            "largest_pair": None
            if self.largest is None
            else (self.largest.first, self.largest.second),
            "base_best": self.base_best,
            "posthoc_best": self.posthoc_best,
            "regret": self.regret,
        }


def reversal_report(
    base: ArrayLike,
    posthoc: ArrayLike,
    labels: Sequence[Hashable] | None = None,
    tol: float = 0.0,
) -> ReversalReport:
    """Reversed pairs of candidates between curves ``base`` and ``posthoc`` (both ``(K,)``)."""
    b = np.asarray(base, dtype=np.float64)
    p = np.asarray(posthoc, dtype=np.float64)
    if b.shape != p.shape or b.ndim != 1 or b.size == 0:
        raise ValueError(f"need two non-empty 1-d curves of equal length, got {b.shape}, {p.shape}")
    names = _labels(labels, b.size)
    db = b[None, :] - b[:, None]
    dp = p[None, :] - p[:, None]
    upper = np.triu(np.ones_like(db, dtype=bool), k=1)
    reversed_ = upper & (db * dp < 0) & (np.abs(db) > tol) & (np.abs(dp) > tol)
    largest = None
    if reversed_.any():
        size = np.where(reversed_, np.minimum(np.abs(db), np.abs(dp)), -np.inf)
        i, j = np.unravel_index(int(np.argmax(size)), size.shape)
        largest = ReversedPair(names[i], names[j], float(db[i, j]), float(dp[i, j]))
    ib, ip = first_argmin(b), first_argmin(p)
    return ReversalReport(
        n_pairs=int(upper.sum()),
        n_reversed=int(reversed_.sum()),
        largest=largest,
        base_best=names[ib],
        posthoc_best=names[ip],
        posthoc_at_base_best=float(p[ib]),
        posthoc_min=float(p[ip]),
    )


@dataclass(frozen=True)
class LossErrorMismatch:
    """Loss–error mismatch of one model's curves; see the module docstring."""

    nll_best: Hashable
    error_best: Hashable
    nll_rise: float
    error_drop: float
    n_steps_after: int
    """Steps ``t−1 → t`` after the NLL minimum."""
    n_mismatched_steps: int
    """Of those, steps with NLL rising and error falling."""
    mismatch: bool

    def as_row(self) -> dict[str, Any]:
        """Flat dict for a table row."""
        return {
            "nll_best": self.nll_best,
            "error_best": self.error_best,
            "nll_rise": self.nll_rise,
            "error_drop": self.error_drop,
            "mismatched_steps": self.n_mismatched_steps,
            "steps_after_nll_min": self.n_steps_after,
            "mismatch": self.mismatch,
        }


def loss_error_mismatch(
    nll: ArrayLike, error: ArrayLike, labels: Sequence[Hashable] | None = None, tol: float = 0.0
) -> LossErrorMismatch:
    """Loss–error mismatch of curves ``nll`` and ``error`` (both ``(E,)``, over epochs)."""
    loss = np.asarray(nll, dtype=np.float64)
    err = np.asarray(error, dtype=np.float64)
    if loss.shape != err.shape:
        raise ValueError(f"nll and error curves differ in shape: {loss.shape} vs {err.shape}")
    names = _labels(labels, loss.size)
    t_loss, t_err = first_argmin(loss), first_argmin(err)
    rise = float(loss[t_err] - loss[t_loss])
    drop = float(err[t_loss] - err[t_err])
    steps_loss = np.diff(loss[t_loss:])
    steps_err = np.diff(err[t_loss:])
    return LossErrorMismatch(
        nll_best=names[t_loss],
        error_best=names[t_err],
        nll_rise=rise,
        error_drop=drop,
        n_steps_after=int(steps_loss.size),
        n_mismatched_steps=int(((steps_loss > 0) & (steps_err < 0)).sum()),
        mismatch=bool(t_err > t_loss and rise > tol and drop > tol),
    )


def reversal_table(
    curves: Mapping[str, Curves],
    base: str = "base",
    metric: str = "nll",
    split: str = "val",
    tol: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per transform: its reversal against ``base`` over epochs on ``split``'s
    ``metric`` (curves averaged over runs), and its own loss–error mismatch on ``split``."""
    key = f"{split}_{metric}"
    reference = curves[base]
    epochs = [int(e) for e in reference.epochs]
    rows = []
    for name, c in curves.items():
        report = reversal_report(reference.mean(key), c.mean(key), epochs, tol)
        mismatch = loss_error_mismatch(
            c.mean(f"{split}_nll"), c.mean(f"{split}_error"), epochs, tol
        )
        rows.append(
            {"transform": name, "curve": key}
            | report.as_row()
            | {f"mismatch_{k}": v for k, v in mismatch.as_row().items()}
        )
    return rows
