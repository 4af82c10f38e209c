"""Classification metrics on a batch of predictions: error, NLL, ECE and Brier score.

Every function takes ``scores`` of shape ``(N, C)`` and integer ``labels`` of shape ``(N,)``
with values in ``0..C-1`` and returns a Python float. ``scores`` are logits (any real numbers,
softmax gives the probabilities) unless ``probs=True``, in which case they are probabilities
whose rows sum to one. Computation is in float64 on the scores' device, so float16 logits
stored by the tracker give the same numbers as their float32 originals up to the storage
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def _numpy(scores: Tensor) -> np.ndarray:
    """``scores`` as a NumPy array on the CPU (bfloat16, which NumPy lacks, as float32)."""
    scores = scores.detach()
    if scores.dtype == torch.bfloat16:
        scores = scores.float()
    return scores.cpu().numpy()


def stacked_classification_metrics(
    scores: Sequence[Tensor], labels: Sequence[Tensor], n_bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """``[classification_metrics(scores[k], labels[k]) for k]`` from logits, in one pass.

    The distinct score tensors (by identity: the same tensor scored against noisy and clean
    labels is one) are concatenated class-major into one float64 array ``x`` of shape
    ``(C, Σ N_u)``. With the row maximum ``m_i = max_c x_ci`` at class ``ĉ_i`` and
    ``e_ci = exp(x_ci − m_i)``, ``s_i = Σ_c e_ci``:

    .. math::

        \\log p_{ci} = x_{ci} − m_i − \\log s_i, \\qquad
        \\max_c p_{ci} = p_{ĉ_i i} = 1 / s_i, \\qquad
        \\textstyle\\sum_c p_{ci}^2 = \\sum_c e_{ci}^2 / s_i^2,

    so one ``exp`` over the batch and a few row reductions give every metric; the probabilities
    themselves are never formed. Each pair ``k`` reads the entries of its labels from that batch
    and its per-pair sums are segment sums (``np.bincount`` with weights). The arithmetic is
    NumPy's: these are a few dozen operations on arrays of some ten thousand entries, where a
    tensor library's per-operation dispatch, not the arithmetic, would dominate (this runs once
    per epoch per tracked model in :class:`~beyondloss.posthoc.tracker.PosthocTracker`). Values
    equal the single-pair functions up to float64 rounding (Brier uses ``Σ_c p² − 2 p_y + 1``).
    """
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"need as many label sets as score sets (>= 1), got {len(labels)}")
    for z, y in zip(scores, labels, strict=True):
        _check(z, y)
    distinct: dict[int, int] = {}
    for z in scores:
        distinct.setdefault(id(z), len(distinct))
    unique = list({id(z): z for z in scores}.values())
    offsets = np.cumsum([0] + [z.shape[0] for z in unique])
    rows = np.concatenate([offsets[distinct[id(z)]] + np.arange(z.shape[0]) for z in scores])
    sizes = np.array([z.shape[0] for z in scores])
    n_pairs = len(scores)
    segment = np.repeat(np.arange(n_pairs), sizes)
    y = np.concatenate([_numpy(t).astype(np.int64, copy=False) for t in labels])
    x = np.concatenate([_numpy(u) for u in unique], dtype=np.float64).T.copy()  # (C, M)
    shifted = x - x.max(axis=0)
    e = np.exp(shifted)
    s = e.sum(axis=0)
    log_p_label = shifted[y, rows] - np.log(s)[rows]
    confidence = 1.0 / s[rows]
    correct = (x.argmax(axis=0)[rows] == y).astype(np.float64)
    square_sum = np.einsum("cm,cm->m", e, e)[rows] * np.square(confidence)
    per_pair = [
        np.bincount(segment, weights, n_pairs)
        for weights in (
            1.0 - correct,
            -log_p_label,
            square_sum - 2.0 * np.exp(log_p_label) + 1.0,
        )
    ]
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(segment * n_bins + bins, correct - confidence, n_pairs * n_bins)
    per_pair.append(np.abs(gap.reshape(n_pairs, n_bins)).sum(axis=1))
    table = np.stack(per_pair, axis=1) / sizes[:, None]
    return [
        {"error": error, "nll": loss, "ece": calibration, "brier": brier_score}
        for error, loss, brier_score, calibration in table.tolist()
    ]
