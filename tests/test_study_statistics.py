"""Tests of the study's statistics on hand-made numbers: t intervals, paired gains and their
orientation, the sign-flip p-value, and the oriented Kendall τ with NaN handling."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from beyondloss.selection.statistics import kendall_tau, mean_ci, mean_within_tau, paired_gain


def test_mean_ci_matches_scipys_student_t_interval() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    low, high = stats.t.interval(0.95, df=4, loc=np.mean(values), scale=stats.sem(values))
    mean, half_width, n = mean_ci(values)
    assert (mean, n) == (4.0, 5)
    assert half_width == pytest.approx((high - low) / 2)
    assert mean_ci(values, level=0.5).half_width < half_width


def test_mean_ci_of_one_value_or_a_diverged_run_has_no_half_width() -> None:
    single = mean_ci([2.5])
    assert (single.mean, single.n) == (2.5, 1) and math.isnan(single.half_width)
    diverged = mean_ci([1.0, math.nan])
    assert math.isnan(diverged.mean) and math.isnan(diverged.half_width)
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])
    with pytest.raises(ValueError, match="level must lie in"):
        mean_ci([1.0, 2.0], level=1.0)


def test_paired_gain_is_positive_when_dopr_is_better_in_either_direction() -> None:
    dopr, base = [2.0, 3.0, 4.0], [1.0, 1.0, 1.0]
    higher = paired_gain(dopr, base, higher_is_better=True)
    lower = paired_gain(dopr, base, higher_is_better=False)
    assert (higher.mean, lower.mean) == (2.0, -2.0)
    assert higher.half_width == lower.half_width == pytest.approx(mean_ci([1, 2, 3]).half_width)
    # All three differences share a sign: 2 of the 2³ sign patterns are as extreme.
    assert higher.p_value == lower.p_value == pytest.approx(0.25)
    assert (higher.n, higher.dropped) == (3, 0)


def test_paired_gain_p_value_is_the_exact_sign_flip_test() -> None:
    differences = np.array([1.0, -2.0, 3.0, 0.5, 0.1])
    patterns = np.array(list(itertools.product((1.0, -1.0), repeat=5)))
    flipped = np.abs((patterns * differences).mean(axis=1))
    expected = np.mean(flipped >= abs(differences.mean()) - 1e-12)
    gain = paired_gain(differences, np.zeros(5), higher_is_better=True)
    assert gain.p_value == pytest.approx(expected)


def test_paired_gain_drops_pairs_with_a_non_finite_value() -> None:
    gain = paired_gain([1.0, math.nan, 3.0], [0.0, 0.0, math.inf], higher_is_better=True)
    assert (gain.mean, gain.n, gain.dropped, gain.p_value) == (1.0, 1, 2, 1.0)
    assert math.isnan(gain.half_width)
    empty = paired_gain([math.nan], [1.0], higher_is_better=False)
    assert (empty.n, empty.dropped) == (0, 1) and math.isnan(empty.mean)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_gain([1.0, 2.0], [1.0], higher_is_better=True)


@pytest.mark.parametrize(
    ("downstream", "higher_is_better", "tau"),
    [
        ([4.0, 3.0, 2.0, 1.0], True, 1.0),
        ([1.0, 2.0, 3.0, 4.0], False, 1.0),
        ([1.0, 2.0, 3.0, 4.0], True, -1.0),
        ([4.0, 3.0, 2.0, 1.0], False, -1.0),
    ],
)
def test_kendall_tau_is_plus_one_when_lower_loss_means_better_downstream(
    downstream: list[float], higher_is_better: bool, tau: float
) -> None:
    result = kendall_tau([0.1, 0.2, 0.3, 0.4], downstream, higher_is_better)
    assert result.tau == pytest.approx(tau) and result.n == 4


def test_kendall_tau_skips_non_finite_points_and_is_nan_without_variation() -> None:
    result = kendall_tau([0.1, math.nan, 0.3, 0.2, 0.5], [3.0, 9.0, 1.0, 2.0, math.inf], True)
    assert (result.tau, result.n) == (pytest.approx(1.0), 3)
    assert math.isnan(kendall_tau([0.1, 0.1, 0.1], [1.0, 2.0, 3.0], True).tau)
    assert math.isnan(kendall_tau([0.1], [1.0], True).tau)


def test_mean_within_tau_sees_agreement_that_pooling_hides() -> None:
    # Inside each group lower loss means a higher metric; group b has both higher loss and a
    # higher metric, so pooled the val loss points the wrong way.
    losses = [1.0, 2.0, 3.0, 4.0, 9.0]
    metric = [10.0, 9.0, 20.0, 19.0, 0.0]
    groups = ["a", "a", "b", "b", "c"]
    assert mean_within_tau(losses, metric, groups, higher_is_better=True) == (1.0, 2)
    assert kendall_tau(losses[:4], metric[:4], higher_is_better=True).tau < 0
