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


class StackedMetrics:
    """Every metric of many (logits, labels) pairs in one pass, for pairs that keep their shapes
    and labels from call to call (the tracker's models × splits × label sets, every epoch).

    Pair ``k`` scores the ``pair_scores[k]``-th score tensor against ``labels[k]``; several pairs
    may share a score tensor (noisy and clean labels of one split). Everything that depends only
    on that layout — which rows of the stacked batch each pair reads, its labels, its segment —
    is computed once here; a call then does only the arithmetic on the new logits.

    The distinct score tensors are concatenated class-major into one float64 array ``x`` of
    shape ``(C, M)``. With the column maximum ``m_i = max_c x_ci`` at class ``ĉ_i``,
    ``e_ci = exp(x_ci − m_i)`` and ``s_i = Σ_c e_ci``:

    .. math::

        \\log p_{ci} = x_{ci} − m_i − \\log s_i, \\qquad
        \\max_c p_{ci} = p_{ĉ_i i} = 1 / s_i, \\qquad
        \\textstyle\\sum_c p_{ci}^2 = \\sum_c e_{ci}^2 / s_i^2,

    so one ``exp`` over the batch and a few column reductions give every metric; the
    probabilities themselves are never formed. Per-pair sums are sums over contiguous segments
    (``np.add.reduceat``), ECE's per-bin gaps one ``np.bincount``. The arithmetic is NumPy's:
    a few dozen operations on arrays of some ten thousand entries, where a tensor library's
    per-operation dispatch, not the arithmetic, would dominate. Values equal the single-pair
    functions up to float64 rounding (Brier uses ``Σ_c p² − 2 p_y + 1``).

    Parameters
    ----------
    score_rows:
        Rows ``N_u`` of each distinct score tensor, in the order the call passes them.
    pair_scores:
        For each pair, the index of its score tensor in ``score_rows``.
    labels:
        For each pair, its integer labels ``(N_u,)``.
    n_bins:
        ECE bins (:func:`ece`).
    """

    def __init__(
        self,
        score_rows: Sequence[int],
        pair_scores: Sequence[int],
        labels: Sequence[Tensor],
        n_bins: int = ECE_BINS,
    ) -> None:
        if len(pair_scores) != len(labels) or not labels:
            raise ValueError(f"need as many label sets as pairs (>= 1), got {len(labels)}")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        offsets = np.cumsum([0, *score_rows])
        sizes = np.array([score_rows[u] for u in pair_scores])
        self.score_rows = tuple(int(n) for n in score_rows)
        self.n_bins = n_bins
        self.rows = np.concatenate([offsets[u] + np.arange(score_rows[u]) for u in pair_scores])
        self.labels = np.concatenate([_numpy(y).astype(np.int64, copy=False) for y in labels])
        if self.labels.shape != self.rows.shape:
            raise ValueError("each pair's labels must have as many entries as its scores' rows")
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.sizes = sizes.astype(np.float64)
        segment = np.repeat(np.arange(len(sizes)), sizes)
        self.bin_base = segment * n_bins
        self.n_pairs = len(sizes)

    def __call__(self, scores: Sequence[Tensor]) -> list[dict[str, float]]:
        """Metrics ``{"error", "nll", "ece", "brier"}`` of every pair, for the distinct score
        tensors ``scores`` (logits, shapes ``(N_u, C)`` as in ``score_rows``)."""
        if tuple(z.shape[0] for z in scores) != self.score_rows:
            raise ValueError(f"expected score tensors of {self.score_rows} rows")
        x = np.concatenate([_numpy(z) for z in scores], dtype=np.float64).T.copy()  # (C, M)
        shifted = x - x.max(axis=0)
        e = np.exp(shifted)
        s = e.sum(axis=0)
        rows, y = self.rows, self.labels
        log_p_label = shifted.reshape(-1)[y * x.shape[1] + rows] - np.log(s)[rows]
        confidence = 1.0 / s[rows]
        correct = (x.argmax(axis=0)[rows] == y).astype(np.float64)
        square_sum = np.einsum("cm,cm->m", e, e)[rows] * np.square(confidence)
        per_sample = np.stack(
            [1.0 - correct, -log_p_label, square_sum - 2.0 * np.exp(log_p_label) + 1.0]
        )
        sums = np.add.reduceat(per_sample, self.starts, axis=1)
        n_bins = self.n_bins
        bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
        gap = np.bincount(self.bin_base + bins, correct - confidence, self.n_pairs * n_bins)
        calibration = np.abs(gap.reshape(self.n_pairs, n_bins)).sum(axis=1)
        table = np.vstack([sums, calibration]) / self.sizes
        return [
            {"error": error, "nll": loss, "ece": ece_value, "brier": brier_score}
            for error, loss, brier_score, ece_value in table.T.tolist()
        ]


def stacked_classification_metrics(
    scores: Sequence[Tensor], labels: Sequence[Tensor], n_bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """``[classification_metrics(scores[k], labels[k]) for k]`` from logits, in one pass
    (:class:`StackedMetrics`). The distinct score tensors, by identity, are softmaxed once: the
    same tensor scored against noisy and clean labels is one."""
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"need as many label sets as score sets (>= 1), got {len(labels)}")
    for z, y in zip(scores, labels, strict=True):
        _check(z, y)
    index: dict[int, int] = {}
    for z in scores:
        index.setdefault(id(z), len(index))
    unique = list({id(z): z for z in scores}.values())
    layout = StackedMetrics(
        [z.shape[0] for z in unique], [index[id(z)] for z in scores], labels, n_bins
    )
    return layout(unique)
