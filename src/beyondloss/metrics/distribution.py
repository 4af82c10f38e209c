"""Distances between a generated sample and a reference sample, and classifier-based scores.

Conventions: a sample is an array of shape ``(n, d)`` — ``n`` points in ``d`` dimensions — given
as a torch tensor or a numpy array; every function computes in float64 and returns a Python
float. Samples holding a non-finite value (a diverged generator) score ``inf`` on the distances,
so they rank last under lower-is-better selection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Sample = Tensor | np.ndarray
"""Points ``(n, d)``, as a torch tensor or a numpy array."""

DEFAULT_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
"""RBF bandwidths σ of :func:`mmd` when none are given, in the samples' units (suits data of
unit scale; pass multiples of :func:`median_pairwise_distance` for other scales)."""

EMD_MAX_ITERATIONS = 100_000_000
"""Network-simplex iteration cap of :func:`wasserstein2` (POT's default, 1e5, stops short of the
optimum for a few thousand points per side)."""


def _as_float64(sample: Sample, name: str) -> np.ndarray:
    array = sample.detach().cpu().double().numpy() if isinstance(sample, Tensor) else sample
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, d) with n >= 1, got {array.shape}")
    return array


def _check_pair(x: Sample, y: Sample) -> tuple[np.ndarray, np.ndarray]:
    x64, y64 = _as_float64(x, "x"), _as_float64(y, "y")
    if x64.shape[1] != y64.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x64.shape} and {y64.shape}")
    return x64, y64


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``‖x_i − y_j‖²`` for ``x`` ``(n, d)``, ``y`` ``(m, d)``: shape ``(n, m)``, clamped ≥ 0."""
    gram = x @ y.T
    return (x.square().sum(1)[:, None] + y.square().sum(1)[None, :] - 2.0 * gram).clamp_min(0.0)


def wasserstein2(x: Sample, y: Sample) -> float:
    """Exact 2-Wasserstein distance between the empirical measures of ``x`` and ``y``.

    .. math::

        W_2(\\hat\\mu_x, \\hat\\mu_y) = \\Big(\\min_{P \\in U(a, b)} \\sum_{i,j}
            P_{ij} \\lVert x_i - y_j \\rVert_2^2\\Big)^{1/2},
        \\qquad a = \\tfrac1n \\mathbf 1_n,\\ b = \\tfrac1m \\mathbf 1_m,

    solved exactly by POT's network simplex (``ot.emd2``). ``x`` is ``(n, d)``, ``y`` is
    ``(m, d)``; the result is in the samples' units. Cost grows about as ``n² … n³`` for
    ``n = m`` (measured on one core: ≈ 35 ms at n = 500, ≈ 1 s at n = 2000 in 2-D).

    Between two independent samples of the same distribution the value is not zero: it shrinks
    with ``n`` like ``n^{-1/d}`` (``d ≥ 3``), so in high dimension it is a relative score.

    The cost matrix is computed with torch (its thread setting applies; numpy's BLAS pool is
    not used). Returns ``inf`` if either sample holds a non-finite value or the cost overflows;
    raises
    ``RuntimeError`` if the solver stops before the optimum.
    """
    import ot  # POT: the optional "flow" extra

    x64, y64 = _check_pair(x, y)
    if not (np.isfinite(x64).all() and np.isfinite(y64).all()):
        return math.inf
    cost = _squared_distances(torch.from_numpy(x64), torch.from_numpy(y64)).numpy()
    if not np.isfinite(cost).all():
        return math.inf
    a = np.full(x64.shape[0], 1.0 / x64.shape[0])
    b = np.full(y64.shape[0], 1.0 / y64.shape[0])
    value, log = ot.emd2(a, b, cost, numItermax=EMD_MAX_ITERATIONS, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"exact OT did not reach the optimum: {log['warning']}")
    return math.sqrt(max(float(value), 0.0))


def mmd(
    x: Sample,
    y: Sample,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    unbiased: bool = True,
) -> float:
    """Squared maximum mean discrepancy MMD² between ``x`` ``(n, d)`` and ``y`` ``(m, d)``.

    The kernel is the mean of RBF kernels over the bandwidths :math:`\\sigma_1..\\sigma_K`,

    .. math::

        k(u, v) = \\frac1K \\sum_{k=1}^K \\exp\\Big(-\\frac{\\lVert u - v\\rVert^2}
            {2\\sigma_k^2}\\Big) \\in (0, 1],

    characteristic, so MMD² is zero only for equal distributions. The unbiased estimator
    (default) leaves out the diagonal terms,

    .. math::

        \\widehat{\\mathrm{MMD}}^2_u = \\frac{\\sum_{i \\ne i'} k(x_i, x_{i'})}{n(n-1)}
            + \\frac{\\sum_{j \\ne j'} k(y_j, y_{j'})}{m(m-1)}
            - \\frac{2}{nm}\\sum_{i,j} k(x_i, y_j),

    and is centred on the true MMD² (so it can be slightly negative when the distributions
    agree); ``unbiased=False`` gives the V-statistic (diagonals in, divided by ``n²`` and
    ``m²``), which is ≥ 0 but ≈ ``2(1 − E k)/n`` above the truth for equal distributions.
    Dimensionless, at most 2. Returns ``inf`` if either sample holds a non-finite value.
    """
    x64, y64 = _check_pair(x, y)
    sigmas = [float(s) for s in bandwidths]
    if not sigmas or not all(math.isfinite(s) and s > 0 for s in sigmas):
        raise ValueError(f"bandwidths must be finite and positive, got {list(bandwidths)}")
    n, m = x64.shape[0], y64.shape[0]
    if unbiased and min(n, m) < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 points per sample, got {n} and {m}")
    if not (np.isfinite(x64).all() and np.isfinite(y64).all()):
        return math.inf
    xt, yt = torch.from_numpy(x64), torch.from_numpy(y64)
    inverse_widths = torch.tensor([0.5 / s**2 for s in sigmas], dtype=torch.float64)

    def kernel_sum(u: Tensor, v: Tensor, drop_diagonal: bool) -> float:
        squared = _squared_distances(u, v)
        total = sum(torch.exp(-w * squared).sum() for w in inverse_widths) / len(sigmas)
        # k(u_i, u_i) = 1 for every i and every bandwidth: the diagonal sums to the count.
        return float(total) - (u.shape[0] if drop_diagonal else 0.0)

    if unbiased:
        xx = kernel_sum(xt, xt, True) / (n * (n - 1))
        yy = kernel_sum(yt, yt, True) / (m * (m - 1))
    else:
        xx = kernel_sum(xt, xt, False) / n**2
        yy = kernel_sum(yt, yt, False) / m**2
    return xx + yy - 2.0 * kernel_sum(xt, yt, False) / (n * m)


def median_pairwise_distance(x: Sample, max_points: int = 1000) -> float:
    """Median Euclidean distance over the distinct pairs of the first ``max_points`` rows of
    ``x`` ``(n, d)``, in its units (the "median heuristic" scale for RBF bandwidths)."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    x64 = torch.from_numpy(_as_float64(x, "x")[:max_points])
    if x64.shape[0] < 2:
        raise ValueError("the median pairwise distance needs at least 2 points")
    rows, cols = torch.triu_indices(x64.shape[0], x64.shape[0], offset=1)
    return float(_squared_distances(x64, x64)[rows, cols].sqrt().median())


def _check_probs(probs: Sample, threshold: float) -> Tensor:
    """``probs`` as a floating tensor, kept in its own precision so that a threshold of 0.9
    compares with a float32 0.9 as equal."""
    p = torch.as_tensor(probs)
    p = p if p.is_floating_point() else p.double()
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with N >= 1, C >= 2, got {tuple(p.shape)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return p


def confident_rate(probs: Sample, threshold: float = 0.9) -> float:
    """Fraction of samples the classifier assigns to some class with probability ≥ ``threshold``.

    ``probs`` ``(N, C)`` are a classifier's class probabilities of ``N`` generated samples. A
    generator of recognisable samples scores near the rate of real held-out data (close to 1);
    one of blurred or noisy samples, whose probabilities spread over classes, scores near 0.
    """
    p = _check_probs(probs, threshold)
    level = torch.tensor(threshold, dtype=p.dtype)
    return float((p.max(dim=1).values >= level).double().mean())


def class_coverage(probs: Sample, threshold: float = 0.9, min_share: float = 0.1) -> float:
    """Fraction of the ``C`` classes covered by confident samples.

    A sample is confident for class ``c = argmax p_i`` when ``max p_i ≥ threshold``; class ``c``
    is covered when it gets at least ``max(1, min_share · N / C)`` confident samples, i.e. at
    least ``min_share`` of its share under a uniform class distribution (``min_share = 0``
    counts any single confident sample). A mode-collapsed generator that makes only a few
    digits scores the fraction of those digits, however confident they are.
    """
    p = _check_probs(probs, threshold)
    if min_share < 0:
        raise ValueError(f"min_share must be non-negative, got {min_share}")
    n, n_classes = p.shape
    confidence, label = p.max(dim=1)
    level = torch.tensor(threshold, dtype=p.dtype)
    counts = torch.bincount(label[confidence >= level], minlength=n_classes)
    needed = max(1.0, min_share * n / n_classes)
    return float((counts >= needed).double().mean())
