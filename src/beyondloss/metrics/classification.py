"""Classification metrics on a batch of predictions: error, NLL, ECE and Brier score.

Every function takes ``scores`` of shape ``(N, C)`` and integer ``labels`` of shape ``(N,)``
with values in ``0..C-1`` and returns a Python float. ``scores`` are logits (any real numbers,
softmax gives the probabilities) unless ``probs=True``, in which case they are probabilities
whose rows sum to one. Computation is in float64 on the scores' device, so float16 logits
stored by the tracker give the same numbers as their float32 originals up to the storage
rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

METRIC_NAMES = ("error", "nll", "ece", "brier")
"""Names of the metrics returned by :func:`classification_metrics`; all are lower-is-better."""

ECE_BINS = 15
"""Default number of equal-width confidence bins of :func:`ece`."""


def _check(scores: Tensor, labels: Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, C), got {tuple(scores.shape)}")
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("metrics need at least one sample")


def _log_probs(scores: Tensor, probs: bool) -> Tensor:
    """Natural-log probabilities ``(N, C)`` in float64; ``log 0 = -inf`` for probabilities."""
    scores = scores.double()
    return scores.log() if probs else torch.log_softmax(scores, dim=1)


def _probs(scores: Tensor, probs: bool) -> Tensor:
    scores = scores.double()
    return scores if probs else torch.softmax(scores, dim=1)


def error_rate(scores: Tensor, labels: Tensor, probs: bool = False) -> float:
    """Top-1 error: fraction of samples with ``argmax_c scores[i, c] != labels[i]``.

    Ties go to the lowest class index (``torch.argmax``). Unit: fraction in [0, 1]. The result
    is the same for logits and probabilities, ``probs`` is accepted for a uniform signature.
    """
    _check(scores, labels)
    return (scores.argmax(dim=1) != labels).double().mean().item()


def nll(scores: Tensor, labels: Tensor, probs: bool = False) -> float:
    """Mean negative log-likelihood ``-(1/N) Σ_i log p_i[y_i]`` in nats (natural log).

    With logits, ``log p = log_softmax(scores)``; a probability of exactly 0 on the label
    gives ``inf``.
    """
    _check(scores, labels)
    log_p = _log_probs(scores, probs)
    return -log_p.gather(1, labels.long().unsqueeze(1)).mean().item()


def ece(scores: Tensor, labels: Tensor, n_bins: int = ECE_BINS, probs: bool = False) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    With confidence ``c_i = max_c p_i[c]`` and correctness ``a_i = [argmax_c p_i[c] = y_i]``,
    sample ``i`` falls in bin ``b = ceil(c_i · n_bins) - 1`` (bins ``(b/B, (b+1)/B]``, a
    confidence of exactly 0 goes to bin 0) and

        ECE = Σ_b (|B_b| / N) · | mean_{i∈B_b} a_i − mean_{i∈B_b} c_i |,

    a fraction in [0, 1]. Empty bins contribute nothing.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    _check(scores, labels)
    p = _probs(scores, probs)
    confidence, prediction = p.max(dim=1)
    correct = (prediction == labels).double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    # Σ_{i∈B_b} (a_i − c_i) = |B_b| · (acc_b − conf_b), so summing |·| / N over bins is the ECE.
    gap = torch.zeros(n_bins, dtype=torch.float64, device=p.device)
    gap.index_add_(0, bins, correct - confidence)
    return (gap.abs().sum() / confidence.numel()).item()


def brier(scores: Tensor, labels: Tensor, probs: bool = False) -> float:
    """Brier score ``(1/N) Σ_i Σ_c (p_i[c] − [c = y_i])²``, in [0, 2]."""
    _check(scores, labels)
    p = _probs(scores, probs)
    one_hot = torch.zeros_like(p).scatter_(1, labels.long().unsqueeze(1), 1.0)
    return (p - one_hot).pow(2).sum(dim=1).mean().item()


def classification_metrics(scores: Tensor, labels: Tensor, probs: bool = False) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` at once, ``{"error", "nll", "ece", "brier"}``, from one
    softmax (the same values as the single-metric functions)."""
    _check(scores, labels)
    p = _probs(scores, probs)
    return {
        "error": error_rate(scores, labels),
        "nll": nll(p, labels, probs=True) if probs else nll(scores, labels),
        "ece": ece(p, labels, probs=True),
        "brier": brier(p, labels, probs=True),
    }
