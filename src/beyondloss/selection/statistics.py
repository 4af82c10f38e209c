"""Statistics of a study over seeds: confidence intervals, paired DoPr-vs-base gains, and the
rank agreement (Kendall τ) between validation loss and the downstream metric.

Pure functions of numbers (numpy, scipy); nothing here reads the store or trains. All intervals
are two-sided Student-t intervals at level :data:`CI_LEVEL` unless a ``level`` is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

CI_LEVEL = 0.95
"""Confidence level of every interval in the study's reports."""

SIGN_FLIP_RESAMPLES = 2**16
"""Sign patterns drawn by the sign-flip test; up to 16 pairs all ``2ⁿ`` are enumerated."""


class MeanCI(NamedTuple):
    """Sample mean, half-width of its confidence interval, and sample size."""

    mean: float
    half_width: float
    n: int


def _t_half_width(values: np.ndarray, level: float) -> float:
    """``t_{(1+level)/2, n−1} · s / √n``; NaN for ``n < 2`` or a non-finite value."""
    n = len(values)
    if n < 2 or not np.isfinite(values).all():
        return math.nan
    quantile = stats.t.ppf((1.0 + level) / 2.0, df=n - 1)
    return float(quantile * values.std(ddof=1) / math.sqrt(n))


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def mean_ci(values: ArrayLike, level: float = CI_LEVEL) -> MeanCI:
    """Mean of ``values`` (shape ``(n,)``) and the half-width of its Student-t interval.

    With ``x̄ = (1/n) Σ x_i`` and ``s² = 1/(n − 1) Σ (x_i − x̄)²``, the half-width is::

        h = t_{(1 + level)/2, n − 1} · s / √n

    so ``x̄ ± h`` covers the population mean with probability ``level`` when the ``x_i`` are
    i.i.d. normal (approximately otherwise). ``h`` is NaN for ``n = 1``; a non-finite value (a
    diverged run) makes the mean non-finite and ``h`` NaN. Raises ``ValueError`` for no values
    or ``level`` outside ``(0, 1)``.
    """
    _check_level(level)
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("mean_ci needs at least one value")
    with np.errstate(invalid="ignore"):
        mean = float(array.mean())
    return MeanCI(mean, _t_half_width(array, level), int(array.size))


@dataclass(frozen=True)
class PairedGain:
    """Mean paired difference, oriented so that positive means the first arm (DoPr) is better.

    Attributes
    ----------
    mean, half_width:
        ``d̄`` and its Student-t half-width (NaN for fewer than 2 pairs).
    p_value:
        Two-sided sign-flip p-value of ``d̄ = 0`` (NaN without pairs).
    n:
        Pairs used.
    dropped:
        Pairs left out because either value is non-finite (a diverged run).
    """

    mean: float
    half_width: float
    p_value: float
    n: int
    dropped: int


def paired_gain(
    dopr_values: ArrayLike,
    base_values: ArrayLike,
    higher_is_better: bool,
    level: float = CI_LEVEL,
) -> PairedGain:
    """Gain of DoPr over its base optimizer, from values paired by seed index.

    Entry ``s`` of both arrays (shape ``(n,)``) is seed ``s``: both runs start from the same
    initialisation and see the batches in the same order, so seed-to-seed variation common to
    both arms cancels in the difference::

        d_s = dopr_s − base_s   if higher_is_better   else   base_s − dopr_s

    (positive = DoPr better). Pairs with a non-finite value are dropped and counted. On the
    ``n`` remaining pairs: ``mean = d̄``, ``half_width = t_{(1+level)/2, n−1} · s_d / √n``, and
    ``p_value`` is the two-sided sign-flip (paired permutation) test: under the null of no
    difference each ``d_s`` is as likely to have either sign, so ``p`` is the share of the
    ``2ⁿ`` sign patterns whose ``|mean|`` is at least ``|d̄|`` — exact up to 16 pairs, else
    from :data:`SIGN_FLIP_RESAMPLES` random patterns (seeded). Its smallest value is
    ``2 / 2ⁿ``: 0.25 with 3 seeds, 0.0625 with 5.
    """
    _check_level(level)
    dopr = np.asarray(dopr_values, dtype=np.float64).reshape(-1)
    base = np.asarray(base_values, dtype=np.float64).reshape(-1)
    if dopr.shape != base.shape:
        raise ValueError(f"paired values need equal lengths, got {dopr.size} and {base.size}")
    finite = np.isfinite(dopr) & np.isfinite(base)
    differences = (dopr - base if higher_is_better else base - dopr)[finite]
    n, dropped = int(differences.size), int((~finite).sum())
    if n == 0:
        return PairedGain(math.nan, math.nan, math.nan, 0, dropped)
    mean = float(differences.mean())
    if n == 1:
        return PairedGain(mean, math.nan, 1.0, 1, dropped)
    test = stats.permutation_test(
        (differences,),
        np.mean,
        permutation_type="samples",
        n_resamples=SIGN_FLIP_RESAMPLES,
        alternative="two-sided",
        vectorized=True,
        rng=np.random.default_rng(0),
    )
    return PairedGain(mean, _t_half_width(differences, level), float(test.pvalue), n, dropped)


class Kendall(NamedTuple):
    """Oriented Kendall τ_b, scipy's two-sided p-value of τ = 0, and the points used."""

    tau: float
    p_value: float
    n: int


def kendall_tau(val_losses: ArrayLike, downstream: ArrayLike, higher_is_better: bool) -> Kendall:
    """How well ordering points by validation loss orders them by the downstream metric.

    Points are the pairs ``(val_losses[i], downstream[i])`` (shape ``(n,)`` each) with both
    values finite. Over all pairs of points, with ``P`` concordant, ``Q`` discordant, ``T_x``
    tied only in loss and ``T_y`` tied only in the metric::

        τ_b = (P − Q) / √((P + Q + T_x) (P + Q + T_y))

    (:func:`scipy.stats.kendalltau`), signed so that ``τ = +1`` means lower val loss ⇔ better
    downstream (val loss perfectly predictive), ``0`` unrelated, ``−1`` exactly misleading:
    ``τ = −τ_b`` if ``higher_is_better`` else ``τ_b``. The p-value is scipy's (exact for small
    samples without ties, normal approximation otherwise) and assumes independent points,
    which checkpoints of one run are not. ``tau`` and ``p_value`` are NaN with fewer than 2
    points or when either coordinate is constant.
    """
    losses = np.asarray(val_losses, dtype=np.float64).reshape(-1)
    metric = np.asarray(downstream, dtype=np.float64).reshape(-1)
    if losses.shape != metric.shape:
        raise ValueError(f"need one metric per loss, got {losses.size} and {metric.size}")
    finite = np.isfinite(losses) & np.isfinite(metric)
    n = int(finite.sum())
    if n < 2:
        return Kendall(math.nan, math.nan, n)
    result = stats.kendalltau(losses[finite], metric[finite])
    sign = -1.0 if higher_is_better else 1.0
    return Kendall(sign * float(result.statistic), float(result.pvalue), n)


class MeanTau(NamedTuple):
    """Mean of the oriented τ over the groups where it is defined, and how many those were."""

    tau: float
    groups: int


def mean_within_tau(
    val_losses: ArrayLike,
    downstream: ArrayLike,
    groups: Sequence[object],
    higher_is_better: bool,
) -> MeanTau:
    """Average of :func:`kendall_tau` computed within each group (e.g. one configuration).

    ``τ̄ = (1/G) Σ_g τ_g`` over the ``G`` groups whose τ is defined (at least 2 finite points,
    neither coordinate constant). Within a configuration only the seed and the epoch vary, so
    this asks whether val loss tracks the downstream metric along training, free of the
    between-configuration differences that dominate the pooled τ. NaN when no group has a τ.
    """
    losses = np.asarray(val_losses, dtype=np.float64).reshape(-1)
    metric = np.asarray(downstream, dtype=np.float64).reshape(-1)
    labels = list(groups)
    if not losses.size == metric.size == len(labels):
        raise ValueError(
            f"need one metric and one group per loss, got {losses.size}, {metric.size}, "
            f"{len(labels)}"
        )
    taus = []
    for label in dict.fromkeys(labels):
        members = np.array([other == label for other in labels])
        tau = kendall_tau(losses[members], metric[members], higher_is_better).tau
        if not math.isnan(tau):
            taus.append(tau)
    return MeanTau(float(np.mean(taus)) if taus else math.nan, len(taus))
