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


def stacked_classification_metrics(
    scores: Sequence[Tensor], labels: Sequence[Tensor], n_bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """``[classification_metrics(scores[k], labels[k]) for k]`` from logits, in one pass.

    The distinct score tensors (by identity: the same tensor scored against noisy and clean
    labels is one) are concatenated into one ``(Σ N_u, C)`` batch: one log-softmax, one
    softmax, one max and one row sum of ``p²`` for all. Each pair ``k`` then only reads the
    entries of its labels, ``row_k(i) · C + y_k[i]``, from that batch, and the per-pair sums are
    segment sums (``index_add``) moved to Python once. A few dozen tensor operations instead of
    a few dozen per pair, which is what the per-epoch tracking of several models on several
    splits costs when the splits are small. Values equal the single-pair functions up to
    float64 summation order (Brier uses ``Σ_c p² − 2 p_y + 1``).
    """
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"need as many label sets as score sets (>= 1), got {len(labels)}")
    for z, y in zip(scores, labels, strict=True):
        _check(z, y)
    distinct: dict[int, int] = {}
    for z in scores:
        distinct.setdefault(id(z), len(distinct))
    unique = list({id(z): z for z in scores}.values())
    offsets = [0]
    for z in unique:
        offsets.append(offsets[-1] + z.shape[0])
    rows = torch.cat([offsets[distinct[id(z)]] + torch.arange(z.shape[0]) for z in scores])
    sizes = torch.tensor([z.shape[0] for z in scores])
    segment = torch.repeat_interleave(torch.arange(len(scores)), sizes)
    y = torch.cat([t.long() for t in labels])
    # Classes along dim 0, samples along dim 1: the reductions over a handful of classes then
    # run vectorized along the samples (about 3x faster than over dim 1 for C = 10).
    log_p = torch.log_softmax(torch.cat([u.double() for u in unique]).t().contiguous(), dim=0)
    p = log_p.exp()
    all_confidence, all_prediction = p.max(dim=0)
    confidence, prediction = all_confidence[rows], all_prediction[rows]
    log_p_label = log_p.view(-1)[y * log_p.shape[1] + rows]
    correct = (prediction == y).double()
    per_sample = torch.stack(
        [1.0 - correct, -log_p_label, p.square().sum(dim=0)[rows] - 2.0 * log_p_label.exp() + 1.0],
        dim=1,
    )
    sums = torch.zeros(len(scores), 3, dtype=torch.float64).index_add_(0, segment, per_sample)
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(len(scores) * n_bins, dtype=torch.float64)
    gap.index_add_(0, segment * n_bins + bins, correct - confidence)
    ece_values = gap.view(len(scores), n_bins).abs().sum(dim=1)
    table = torch.cat([sums, ece_values.unsqueeze(1)], dim=1) / sizes.unsqueeze(1).double()
    return [
        {"error": error, "nll": loss, "ece": calibration, "brier": brier_score}
        for error, loss, brier_score, calibration in table.tolist()
    ]
