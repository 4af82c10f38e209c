"""Damped inverses of activation second moments, dense or block-diagonal, never NaN.

Σ is held as a list of diagonal blocks over contiguous coordinate ranges (one block: dense Σ;
a single vector: diagonal Σ, as for embeddings). The preconditioner is P = (Σ + λI)⁻¹, computed
block by block, with one ridge for the whole layer:

    λ = max(γ · tr(Σ) / d, λ_min)     (``damping_mode="trace_over_dim"``, the default)
    λ = max(γ · tr(Σ),     λ_min)     (``damping_mode="trace"``, the DoPr paper's formula)

where tr(Σ) sums the traces of all blocks and d is the layer's side. ``tr(Σ)/d`` is the mean
eigenvalue, so the default makes γ a *relative* ridge that means the same thing for every layer
width; the paper's ridge grows with d. ``λ_min`` is a tiny absolute floor so that Σ = 0 (dead
inputs) still factors. Block-diagonal Σ with blocks of at most B coordinates costs d·B memory
and d·B² to factor instead of d² and d³, and equals the dense P whenever one block covers the
layer (distributed Shampoo's ``max_preconditioner_dim`` makes the same trade).

A dense block is factored by Cholesky (``cholesky_ex``, which reports failure instead of
raising); if fp32 round-off makes Σ + λI numerically indefinite, λ is multiplied by 10 and the
factorization retried, and after that an eigendecomposition with eigenvalues clipped at zero is
used. A diagonal Σ is inverted elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from beyondloss.optim.config import DAMPING_MODES

MIN_DAMPING = 1e-12
CHOLESKY_RETRIES = 4

__all__ = ["DAMPING_MODES", "Inverse", "block_bounds", "damped_inverse", "ridge"]


def block_bounds(dim: int, max_block_size: int | None) -> list[tuple[int, int]]:
    """Contiguous ranges ``[(start, stop), ...]`` covering ``range(dim)``, each ≤ the maximum.

    ``None`` (or a maximum ≥ dim) gives one block. Blocks are as equal as the maximum allows
    from the left; only the last may be shorter.
    """
    if dim <= 0:
        return []
    size = dim if max_block_size is None else min(max_block_size, dim)
    return [(start, min(start + size, dim)) for start in range(0, dim, size)]


@dataclass
class Inverse:
    """P as blocks (matrices over ``bounds``, or one diagonal vector) and the ridge λ used."""

    blocks: list[Tensor]
    bounds: list[tuple[int, int]]
    damping: float
    method: str  # "cholesky" | "eigh" | "diagonal" (the most robust method any block needed)

    def apply(self, grad: Tensor) -> Tensor:
        """M = G P for G of shape (d_out, d)."""
        if self.method == "diagonal":
            return grad * self.blocks[0].to(grad.dtype)
        if len(self.blocks) == 1:
            return grad @ self.blocks[0].to(grad.dtype)
        return torch.cat(
            [
                grad[:, start:stop] @ block.to(grad.dtype)
                for (start, stop), block in zip(self.bounds, self.blocks, strict=True)
            ],
            dim=1,
        )

    def numel(self) -> int:
        """Number of stored entries of P."""
        return sum(block.numel() for block in self.blocks)


def ridge(blocks: list[Tensor], gamma: float, mode: str) -> float:
    """λ for Σ given as blocks (matrices) or one diagonal vector, see the module docstring."""
    diagonals = [block if block.dim() == 1 else block.diagonal() for block in blocks]
    trace = sum(float(diag.sum()) for diag in diagonals)
    dim = sum(diag.numel() for diag in diagonals)
    scale = trace / dim if mode == "trace_over_dim" else trace
    return max(gamma * scale, MIN_DAMPING)


def _dense_inverse(sigma: Tensor, lam: float) -> tuple[Tensor, str]:
    """(Σ + λI)⁻¹ of one block by Cholesky with growing λ, else a clipped eigendecomposition."""
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    for _ in range(CHOLESKY_RETRIES):
        factor, info = torch.linalg.cholesky_ex(sigma + lam * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(factor), "cholesky"
        lam *= 10.0
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma.double())
    inverse_eigenvalues = 1.0 / (eigenvalues.clamp_min(0.0) + lam)
    matrix = (eigenvectors * inverse_eigenvalues) @ eigenvectors.T
    return matrix.to(sigma.dtype), "eigh"


def damped_inverse(
    blocks: list[Tensor], gamma: float, mode: str, name: str = "layer"
) -> Inverse:
    """P = (Σ + λI)⁻¹ in fp32 (fp64 when Σ is fp64), see the module docstring.

    ``blocks`` is one diagonal vector, or the diagonal blocks of Σ in coordinate order.
    Raises ``FloatingPointError`` naming ``name`` if Σ holds a NaN or an infinity.
    """
    blocks = [block.to(torch.promote_types(block.dtype, torch.float32)) for block in blocks]
    if not all(bool(torch.isfinite(block).all()) for block in blocks):
        raise FloatingPointError(
            f"activation second moment of {name!r} contains NaN or inf; "
            "the layer's inputs are not finite"
        )
    lam = ridge(blocks, gamma, mode)
    if blocks[0].dim() == 1:
        (diagonal,) = blocks
        inverse = 1.0 / (diagonal.clamp_min(0.0) + lam)
        return Inverse([inverse], [(0, diagonal.numel())], lam, "diagonal")
    inverses, methods, bounds, start = [], set(), [], 0
    for block in blocks:
        matrix, method = _dense_inverse(block, lam)
        inverses.append(matrix)
        methods.add(method)
        bounds.append((start, start + block.shape[0]))
        start += block.shape[0]
    return Inverse(inverses, bounds, lam, "eigh" if "eigh" in methods else "cholesky")

