"""Classification metrics on hand cases: perfect, uniform, constant and calibrated predictors."""

from __future__ import annotations

import math

import pytest
import torch

from beyondloss.metrics.classification import (
    brier,
    classification_metrics,
    ece,
    error_rate,
    nll,
)


def test_perfect_classifier_has_zero_error_nll_ece_and_brier() -> None:
    labels = torch.tensor([0, 2, 1, 2])
    logits = 100.0 * torch.nn.functional.one_hot(labels, 3).float()
    values = classification_metrics(logits, labels)
    assert values["error"] == 0.0
    assert values["nll"] == pytest.approx(0.0, abs=1e-12)
    assert values["ece"] == pytest.approx(0.0, abs=1e-12)
    assert values["brier"] == pytest.approx(0.0, abs=1e-12)


def test_error_counts_wrong_argmax_and_breaks_ties_to_the_lowest_class() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert error_rate(logits, torch.tensor([0, 0, 0])) == pytest.approx(1 / 3)


def test_uniform_predictor_has_nll_log_c_and_brier_one_minus_one_over_c() -> None:
    logits, labels = torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert nll(logits, labels) == pytest.approx(math.log(4))
    assert brier(logits, labels) == pytest.approx(3 / 4)


def test_calibrated_constant_predictor_has_zero_ece_from_logits_and_probs() -> None:
    probs = torch.tensor([0.7, 0.3], dtype=torch.float64).repeat(10, 1)
    labels = torch.tensor([0] * 7 + [1] * 3)
    assert ece(probs, labels, probs=True) == pytest.approx(0.0, abs=1e-12)
    assert ece(probs.log(), labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_overconfident_constant_predictor_is_the_confidence_gap() -> None:
    probs = torch.tensor([0.9, 0.1]).repeat(10, 1)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert ece(probs, labels, probs=True) == pytest.approx(0.3)


def test_ece_averages_bins_weighted_by_their_counts() -> None:
    # Two bins: 4 samples at confidence 0.95 all right (gap 0.05), 4 at 0.55 half right (0.05).
    probs = torch.tensor([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    assert ece(probs, labels, probs=True) == pytest.approx(0.05)


def test_brier_of_a_confident_wrong_prediction_is_two() -> None:
    assert brier(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), probs=True) == pytest.approx(2.0)


def test_float16_logits_give_float32_metrics_up_to_storage_rounding() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 5, generator=generator)
    labels = torch.randint(0, 5, (200,), generator=generator)
    full = classification_metrics(logits, labels)
    half = classification_metrics(logits.half(), labels)
    for name in full:
        assert half[name] == pytest.approx(full[name], abs=5e-3)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="labels"):
        nll(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins"):
        ece(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), n_bins=0)


def test_stacked_metrics_equal_the_single_pair_metrics() -> None:
    from beyondloss.metrics.classification import stacked_classification_metrics

    generator = torch.Generator().manual_seed(3)
    scores = [3 * torch.randn(n, 7, generator=generator) for n in (50, 1, 120)]
    scores[0] = scores[0].half()  # stored logits are float16
    scores[1][0, 2] = 80.0  # a saturated softmax
    scores[2] = scores[2].bfloat16()  # NumPy has no bfloat16: converted on the way
    labels = [torch.randint(0, 7, (z.shape[0],), generator=generator) for z in scores]
    stacked = stacked_classification_metrics(scores, labels)
    for z, y, values in zip(scores, labels, stacked, strict=True):
        assert values == pytest.approx(classification_metrics(z, y), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="as many label sets"):
        stacked_classification_metrics(scores, labels[:2])
    with pytest.raises(ValueError, match="labels must have shape"):
        stacked_classification_metrics(scores[:1], labels[1:2])


def test_a_stacked_layout_is_reused_across_calls() -> None:
    """One layout (two score tensors, three pairs: the first scored against two label sets)
    gives the single-pair metrics for every new set of logits, the way the tracker calls it
    once per epoch."""
    from beyondloss.metrics.classification import StackedMetrics

    generator = torch.Generator().manual_seed(5)
    labels = [torch.randint(0, 4, (n,), generator=generator) for n in (30, 30, 9)]
    layout = StackedMetrics([30, 9], [0, 0, 1], labels)
    for _ in range(3):
        scores = [(4 * torch.randn(n, 4, generator=generator)).half() for n in (30, 9)]
        values = layout(scores)
        for k, (position, y) in enumerate(zip([0, 0, 1], labels, strict=True)):
            expected = classification_metrics(scores[position], y)
            assert values[k] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="rows"):
        layout([scores[1], scores[0]])
    with pytest.raises(ValueError, match="as many entries"):
        StackedMetrics([30, 9], [0, 1], [labels[0], labels[0]])
