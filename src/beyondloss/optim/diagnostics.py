"""Per-layer spectrum of the activation second moment Σ, and what AP makes of it.

AP multiplies the gradient's component along Σ's eigenvector u_i by 1/(σ_i + λ), so the spread
of those gains says how unevenly a layer's update is reshaped:

    condition        σ_max / σ_min                        of Σ itself (inf when σ_min = 0)
    effective rank   exp(−Σ_i p_i log p_i), p_i = σ_i / Σ_j σ_j      (1 … dim)
    amplification    (σ_max + λ) / (σ_min + λ)            largest over smallest gain of P

A large amplification means directions the training inputs barely excite get steps many times
larger than the dominant ones — the directions a closed-loop deployment may excite more than
training did. :func:`directional_profile` measures that second half: along each u_i, the
second moment of the inputs a deployed model meets against the training one,

    excitation_i = u_iᵀ Σ_deployed u_i / σ_i,

beside AP's relative gain (σ_max + λ)/(σ_i + λ) and, for a weight W, its response ‖W u_i‖.

Σ is read as the preconditioner holds it (its blocks, or the diagonal of an embedding); a
block-diagonal Σ's eigenvalues are those of its blocks. λ is the ridge
:func:`~beyondloss.optim.linalg.ridge` gives for that Σ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from beyondloss.optim.linalg import ridge

AMPLIFICATION_WARNING = 1e3
"""Default threshold of :func:`warn_amplification`: a layer whose largest AP gain exceeds its
smallest by more than this factor is reported (the pendulum policy's first layer reached
about 2000 at the default damping, docs/ttf-full.md)."""


@dataclass(frozen=True)
class LayerSpectrum:
    """Spectrum summary of one layer's Σ (see the module docstring); floats in Σ's units."""

    dim: int
    eigenvalue_max: float
    eigenvalue_min: float
    condition: float
    effective_rank: float
    damping: float
    amplification: float

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """``{f"{prefix}{field}": value}``, e.g. for a results store."""
        return {f"{prefix}{name}": float(value) for name, value in asdict(self).items()}


def eigenvalues(blocks: list[Tensor]) -> Tensor:
    """All eigenvalues of Σ given as a diagonal vector or as diagonal blocks, in float64."""
    if blocks[0].dim() == 1:
        return blocks[0].double()
    return torch.cat([torch.linalg.eigvalsh(block.double()) for block in blocks])


def layer_spectrum(blocks: list[Tensor], damping: float, damping_mode: str) -> LayerSpectrum:
    """The :class:`LayerSpectrum` of Σ (``blocks`` as the preconditioner holds it)."""
    values = eigenvalues(blocks).clamp_min(0.0)
    top, bottom = float(values.max()), float(values.min())
    total = float(values.sum())
    if total > 0.0:
        p = values[values > 0] / total
        effective_rank = math.exp(float(-(p * p.log()).sum()))
    else:
        effective_rank = 0.0
    lam = ridge(blocks, damping, damping_mode)
    return LayerSpectrum(
        dim=values.numel(),
        eigenvalue_max=top,
        eigenvalue_min=bottom,
        condition=top / bottom if bottom > 0.0 else math.inf,
        effective_rank=effective_rank,
        damping=lam,
        amplification=(top + lam) / (bottom + lam),
    )


def warn_amplification(
    spectra: Mapping[str, LayerSpectrum], threshold: float = AMPLIFICATION_WARNING
) -> list[str]:
    """Warn once, naming the layers whose amplification exceeds ``threshold``; return them."""
    loud = [name for name, s in spectra.items() if s.amplification > threshold]
    if loud:
        detail = ", ".join(f"{name!r} {spectra[name].amplification:.3g}×" for name in loud)
        warnings.warn(
            f"activation preconditioning amplifies the least-excited input directions of "
            f"{detail} over the most-excited (threshold {threshold:g}×); raise `damping` "
            "and re-tune the learning rate (the relative ridge γ; 0.1 restored DoPr-Muon on "
            "the pendulum at its re-tuned lr, docs/dopr-defaults.md), or leave these layers "
            "out with `exclude=[...]` (the output head: `scope='no_head'`)",
            stacklevel=2,
        )
    return loud


@dataclass(frozen=True)
class DirectionalProfile:
    """A layer's inputs along the eigenvectors of its training Σ, weakest direction first.

    ``vectors[:, i]`` is u_i; ``train[i]`` is σ_i = u_iᵀ Σ u_i; ``deployed[i]`` is
    u_iᵀ Σ_deployed u_i, the same uncentered second moment over the inputs met when deployed;
    ``gain[i]`` is (σ_max + λ)/(σ_i + λ), how much more AP scales a gradient along u_i than
    along the most-excited direction.
    """

    vectors: Tensor
    train: Tensor
    deployed: Tensor
    gain: Tensor

    @property
    def excitation(self) -> Tensor:
        """``deployed / train``: how many times more the deployment excites each direction
        than training did (inf where training never did)."""
        return self.deployed / self.train.clamp_min(0.0)

    def response(self, weight: Tensor) -> Tensor:
        """‖W u_i‖ of ``weight`` W ``(out, dim)``: how strongly the layer reacts along u_i."""
        return (weight.double() @ self.vectors).norm(dim=0)


def directional_profile(
    sigma: Tensor, deployed_inputs: Tensor, damping: float, damping_mode: str
) -> DirectionalProfile:
    """The :class:`DirectionalProfile` of a dense training ``sigma`` ``(dim, dim)`` (as the
    preconditioner holds it, bias coordinate included) against ``deployed_inputs``
    ``(n, dim)``, the layer's inputs in deployment (with the bias coordinate 1 appended where
    Σ has one). λ is the preconditioner's ridge for ``sigma``."""
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma must be a square matrix, got shape {tuple(sigma.shape)}")
    if deployed_inputs.dim() != 2 or deployed_inputs.shape[1] != sigma.shape[0]:
        raise ValueError(
            f"deployed_inputs must be (n, {sigma.shape[0]}), got {tuple(deployed_inputs.shape)}"
        )
    values, vectors = torch.linalg.eigh(sigma.double())
    values = values.clamp_min(0.0)
    lam = ridge([sigma], damping, damping_mode)
    deployed = (deployed_inputs.double() @ vectors).square().mean(dim=0)
    return DirectionalProfile(
        vectors=vectors, train=values, deployed=deployed, gain=(values.max() + lam) / (values + lam)
    )
