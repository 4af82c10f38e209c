"""W2, MMD² and classifier scores on hand-made samples whose values are known."""

import math

import numpy as np
import pytest
import torch

from beyondloss.metrics.distribution import (
    class_coverage,
    confident_rate,
    median_pairwise_distance,
    mmd,
    wasserstein2,
)


def _points(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_w2_of_a_sample_with_itself_is_zero() -> None:
    x = _points(200, 3)
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-6)
    assert wasserstein2(x, x[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-6)


def test_w2_between_a_sample_and_its_translate_is_the_shift_length() -> None:
    x = _points(150, 2)
    shift = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert wasserstein2(x, x + shift) == pytest.approx(5.0, rel=1e-9)


def test_w2_with_unequal_sizes_moves_mass_to_the_nearest_points() -> None:
    # Mass 1/2 at 0 and 1/2 at 2 against mass 1 at 1: every unit of mass travels 1.
    x = np.array([[0.0], [2.0]])
    y = np.array([[1.0]])
    assert wasserstein2(x, y) == pytest.approx(1.0)
    # Uniform over {0, 1, 2, 3} against {0, 3}: half the mass travels 1, W2 = 1/√2.
    four = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert wasserstein2(four, np.array([[0.0], [3.0]])) == pytest.approx(math.sqrt(0.5))


def test_nonfinite_samples_score_infinite_distances() -> None:
    x = _points(20, 2)
    broken = x.clone()
    broken[3, 1] = float("nan")
    assert wasserstein2(broken, x) == math.inf
    assert wasserstein2(x, torch.full_like(x, 1e300)) == math.inf
    assert mmd(broken, x) == math.inf


def test_dimension_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="same dimension"):
        wasserstein2(_points(5, 2), _points(5, 3))
    with pytest.raises(ValueError, match="shape"):
        mmd(torch.zeros(5), torch.zeros(5))


def test_biased_mmd_of_two_single_points_matches_the_kernel_formula() -> None:
    # MMD²_b({a}, {b}) = k(a,a) + k(b,b) − 2 k(a,b) = 2 − 2 exp(−|a−b|² / 2σ²).
    a, b = np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]])
    expected = 2.0 - 2.0 * math.exp(-0.5)
    assert mmd(a, b, bandwidths=[1.0], unbiased=False) == pytest.approx(expected)
    mixed = 2.0 - (math.exp(-0.5) + math.exp(-0.125))
    assert mmd(a, b, bandwidths=[1.0, 2.0], unbiased=False) == pytest.approx(mixed)


def test_unbiased_mmd_leaves_out_the_diagonal_terms() -> None:
    x = np.array([[0.0], [1.0]])
    y = np.array([[0.0], [3.0]])

    def k(u: float, v: float) -> float:
        return math.exp(-((u - v) ** 2) / 2.0)

    cross = (k(0, 0) + k(0, 3) + k(1, 0) + k(1, 3)) / 4.0
    expected = k(0, 1) + k(0, 3) - 2.0 * cross
    assert mmd(x, y, bandwidths=[1.0]) == pytest.approx(expected)


def test_mmd_is_zero_for_identical_and_two_for_far_apart_samples() -> None:
    x = _points(100, 2)
    assert mmd(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    # Unbiased: identical samples sit −2(1 − mean off-diagonal kernel)/n below zero, O(1/n).
    assert -0.02 < mmd(x, x) <= 0.0
    # Two point masses far apart: k = 1 within each, 0 across, so MMD² = 1 + 1 − 0 (the maximum).
    assert mmd(x * 0.0, x * 0.0 + 1e4) == pytest.approx(2.0)
    assert mmd(x * 0.0, x * 0.0 + 1e4, unbiased=False) == pytest.approx(2.0)


def test_mmd_separates_a_shifted_sample_from_a_fresh_one() -> None:
    x, fresh = _points(300, 2, seed=1), _points(300, 2, seed=2)
    same = mmd(x, fresh)
    shifted = mmd(x, fresh + 1.0)
    assert abs(same) < 0.01 < shifted


def test_mmd_rejects_bad_bandwidths_and_single_points_for_the_unbiased_form() -> None:
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(_points(4, 2), _points(4, 2), bandwidths=[0.0])
    with pytest.raises(ValueError, match="at least 2"):
        mmd(_points(1, 2), _points(4, 2))


def test_median_pairwise_distance_of_three_collinear_points() -> None:
    # Distances 1, 2, 3: the median is 2.
    assert median_pairwise_distance(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)


def test_confident_rate_counts_rows_whose_top_probability_reaches_the_threshold() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    assert confident_rate(probs, threshold=0.9) == pytest.approx(0.5)
    assert confident_rate(torch.eye(4)) == 1.0
    assert confident_rate(torch.full((7, 4), 0.25)) == 0.0


def test_class_coverage_of_perfect_collapsed_and_uniform_predictions() -> None:
    assert class_coverage(torch.eye(5).repeat(3, 1)) == 1.0
    collapsed = torch.zeros(30, 5)
    collapsed[:, 2] = 1.0
    assert class_coverage(collapsed) == pytest.approx(0.2)
    assert class_coverage(torch.full((30, 5), 0.2)) == 0.0


def test_class_coverage_needs_a_share_of_the_uniform_count() -> None:
    # N = 100, C = 4: uniform share 25; min_share 0.2 needs at least 5 confident samples.
    labels = torch.tensor([0] * 90 + [1] * 5 + [2] * 4 + [3] * 1)
    probs = torch.nn.functional.one_hot(labels, 4).double()
    assert class_coverage(probs, min_share=0.2) == pytest.approx(0.5)
    assert class_coverage(probs, min_share=0.0) == 1.0
    # Unconfident rows count for no class, even when they are the argmax.
    probs[90:] = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    assert class_coverage(probs, min_share=0.0) == pytest.approx(0.25)


def test_classifier_scores_validate_their_inputs() -> None:
    with pytest.raises(ValueError, match="threshold"):
        confident_rate(torch.eye(3), threshold=0.0)
    with pytest.raises(ValueError, match="shape"):
        class_coverage(torch.ones(3))
    with pytest.raises(ValueError, match="min_share"):
        class_coverage(torch.eye(3), min_share=-0.1)
