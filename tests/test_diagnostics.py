"""The per-layer spectrum summary of Σ, on hand-made Σ with known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from beyondloss.optim import ActivationPreconditioner
from beyondloss.optim.diagnostics import layer_spectrum, warn_amplification


def rotated(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q, so the test cannot read the diagonal."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator,
                                       dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_dense_sigma_with_known_eigenvalues() -> None:
    spectrum = layer_spectrum([rotated([4.0, 1.0, 0.25, 0.75])], 0.1, "trace_over_dim")
    lam = 0.1 * (4.0 + 1.0 + 0.25 + 0.75) / 4
    p = torch.tensor([4.0, 1.0, 0.25, 0.75], dtype=torch.float64) / 6.0
    assert spectrum.dim == 4
    assert spectrum.eigenvalue_max == pytest.approx(4.0)
    assert spectrum.eigenvalue_min == pytest.approx(0.25)
    assert spectrum.condition == pytest.approx(16.0)
    assert spectrum.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert spectrum.damping == pytest.approx(lam)
    assert spectrum.amplification == pytest.approx((4.0 + lam) / (0.25 + lam))


def test_equal_eigenvalues_have_full_effective_rank_and_no_amplification() -> None:
    spectrum = layer_spectrum([rotated([2.0] * 5)], 1e-3, "trace")
    assert spectrum.effective_rank == pytest.approx(5.0)
    assert spectrum.condition == pytest.approx(1.0)
    assert spectrum.amplification == pytest.approx(1.0)


def test_singular_sigma_is_infinitely_conditioned_but_the_ridge_bounds_amplification() -> None:
    spectrum = layer_spectrum([rotated([3.0, 0.0, 0.0])], 1e-2, "trace")
    assert spectrum.condition == math.inf
    assert spectrum.effective_rank == pytest.approx(1.0)
    assert spectrum.amplification == pytest.approx((3.0 + 0.03) / 0.03)


def test_block_diagonal_and_diagonal_sigma_use_their_blocks_eigenvalues() -> None:
    blocks = [rotated([9.0, 1.0], seed=1), rotated([0.5, 0.1, 0.4], seed=2)]
    spectrum = layer_spectrum(blocks, 0.0, "trace_over_dim")
    assert (spectrum.dim, spectrum.eigenvalue_max) == (5, pytest.approx(9.0))
    assert spectrum.eigenvalue_min == pytest.approx(0.1)
    diagonal = layer_spectrum([torch.tensor([0.5, 0.25, 0.25])], 0.0, "trace")
    assert diagonal.condition == pytest.approx(2.0)


def test_preconditioner_reports_each_layer_and_warns_past_the_threshold() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    ap = ActivationPreconditioner(layer, damping=1e-6, cov_every=1, ema_decay=0.0)
    x = torch.randn(256, 3) * torch.tensor([1.0, 1.0, 1e-3])  # one barely excited input
    layer(x).sum().backward()
    ap.precondition()
    (spectrum,) = ap.spectra().values()
    want = layer_spectrum([x.T.double() @ x.double() / 256], 1e-6, "trace_over_dim")
    assert spectrum.amplification == pytest.approx(want.amplification, rel=1e-3)
    assert spectrum.amplification > 1e5
    metrics = ap.spectrum_metrics()
    assert metrics["ap/(root)/amplification"] == spectrum.amplification
    with pytest.warns(UserWarning, match=r"raise `damping`"):
        assert warn_amplification(ap.spectra()) == [""]
    assert warn_amplification(ap.spectra(), threshold=1e9) == []
