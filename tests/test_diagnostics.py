"""The per-layer spectrum summary of Σ, on hand-made Σ with known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from beyondloss.optim import ActivationPreconditioner
from beyondloss.optim.diagnostics import directional_profile, layer_spectrum, warn_amplification


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
    with pytest.warns(UserWarning, match=r"raise `damping` and re-tune the learning rate"):
        assert warn_amplification(ap.spectra()) == [""]
    assert warn_amplification(ap.spectra(), threshold=1e9) == []


def test_directional_profile_reads_the_deployed_excess_along_each_training_direction() -> None:
    # Training inputs along three orthogonal directions with second moments 4, 1 and 0.01;
    # deployed inputs with 4, 2 and 1 along the same directions: the weakest direction is
    # excited 100 times more than in training, the strongest exactly as much.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    sigma = q @ torch.diag(torch.tensor([4.0, 1.0, 0.01], dtype=torch.float64)) @ q.T
    signs = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    deployed_inputs = (signs * torch.tensor([2.0, 2.0**0.5, 1.0], dtype=torch.float64)) @ q.T
    profile = directional_profile(sigma, deployed_inputs, 0.1, "trace_over_dim")
    lam = 0.1 * 5.01 / 3

    def f64(*values: float) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    torch.testing.assert_close(profile.train, f64(0.01, 1.0, 4.0))
    torch.testing.assert_close(profile.deployed, f64(1.0, 2.0, 4.0))
    torch.testing.assert_close(profile.excitation, f64(100.0, 2.0, 1.0))
    gains = f64((4 + lam) / (0.01 + lam), (4 + lam) / (1 + lam), 1.0)
    torch.testing.assert_close(profile.gain, gains)
    # A weight that reads only the weakest direction responds only along it.
    weight = 3.0 * q[:, 2:3].T
    torch.testing.assert_close(profile.response(weight), f64(3.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"deployed_inputs must be \(n, 3\)"):
        directional_profile(sigma, deployed_inputs[:, :2], 0.1, "trace")
