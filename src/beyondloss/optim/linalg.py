"""Damped inverses of activation second moments, with fallbacks that never return NaN.

For Σ ⪰ 0 of side d the preconditioner is P = (Σ + λ I)⁻¹ with

    λ = max(γ · tr(Σ) / d, λ_min)     (``damping_mode="trace_over_dim"``, the default)
    λ = max(γ · tr(Σ),     λ_min)     (``damping_mode="trace"``, the seed paper's formula)

``tr(Σ)/d`` is the mean eigenvalue, so the default makes γ a *relative* ridge that means the
same thing for every layer width; the seed formula's ridge grows with d. ``λ_min`` is a tiny
absolute floor so that Σ = 0 (dead inputs) still factors.

Dense Σ is factored by Cholesky (``cholesky_ex``, which reports failure instead of raising);
if fp32 round-off makes Σ + λI numerically indefinite, λ is multiplied by 10 and the
factorization retried, and after that an eigendecomposition with eigenvalues clipped at zero is
used. Diagonal Σ (embeddings) is inverted elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DAMPING_MODES = ("trace_over_dim", "trace")
MIN_DAMPING = 1e-12
CHOLESKY_RETRIES = 4


@dataclass
class Inverse:
    """P (a (d, d) matrix, or its diagonal as a (d,) vector) and the ridge λ actually used."""

    matrix: Tensor
    damping: float
    method: str  # "cholesky" | "eigh" | "diagonal"

    def apply(self, grad: Tensor) -> Tensor:
        """M = G P for G of shape (d_out, d)."""
        if self.matrix.dim() == 1:
            return grad * self.matrix.to(grad.dtype)
        return grad @ self.matrix.to(grad.dtype)


def ridge(sigma: Tensor, gamma: float, mode: str) -> float:
    """λ for Σ (matrix or diagonal vector), see the module docstring."""
    diag = sigma if sigma.dim() == 1 else sigma.diagonal()
    trace = float(diag.sum())
    scale = trace / diag.numel() if mode == "trace_over_dim" else trace
    return max(gamma * scale, MIN_DAMPING)


def damped_inverse(sigma: Tensor, gamma: float, mode: str, name: str = "layer") -> Inverse:
    """P = (Σ + λI)⁻¹ in fp32 (fp64 when Σ is fp64), see the module docstring.

    Raises ``FloatingPointError`` naming ``name`` if Σ holds a NaN or an infinity.
    """
    sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
    if not bool(torch.isfinite(sigma).all()):
        raise FloatingPointError(
            f"activation second moment of {name!r} contains NaN or inf; "
            "the layer's inputs are not finite"
        )
    lam = ridge(sigma, gamma, mode)
    if sigma.dim() == 1:
        return Inverse(1.0 / (sigma.clamp_min(0.0) + lam), lam, "diagonal")
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    for _ in range(CHOLESKY_RETRIES):
        factor, info = torch.linalg.cholesky_ex(sigma + lam * eye)
        if int(info) == 0:
            return Inverse(torch.cholesky_inverse(factor), lam, "cholesky")
        lam *= 10.0
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma.double())
    inverse_eigenvalues = 1.0 / (eigenvalues.clamp_min(0.0) + lam)
    matrix = (eigenvectors * inverse_eigenvalues) @ eigenvectors.T
    return Inverse(matrix.to(sigma.dtype), lam, "eigh")
