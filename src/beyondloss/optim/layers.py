"""One helper per layer kind: how its inputs become rows z and its gradient becomes G.

The activation preconditioner only talks to the :class:`LayerHelper` interface; this module is
the one place that knows what a ``Linear``, a ``Conv`` or an ``Embedding`` is.

Conventions (shared by every helper)
------------------------------------
* A layer computes ``y = W z (+ b)`` for input rows ``z ∈ R^{d_in}``; its gradient in that
  convention is ``G ∈ R^{d_out × dim}`` where ``dim = d_in + 1`` when the bias is trained (the
  bias is the weight of a constant input 1, so it is preconditioned together with ``W``).
* ``moments(x)`` returns the sufficient statistics of one forward pass: ``(S, s, n)`` with
  ``S = Σ_i z_i z_iᵀ`` (dense kinds) or the per-coordinate counts (diagonal kinds),
  ``s = Σ_i z_i`` and ``n`` the number of rows. They add up across forwards and ranks.
* ``covariance(S, s, n)`` turns pooled statistics into the uncentered second moment of the
  (bias-extended) rows, ``Σ = (1/n) Σ_i z̃_i z̃_iᵀ`` with ``z̃ = [z; 1]``:
  ``Σ = [[S/n, s/n], [sᵀ/n, 1]]``. Diagonal kinds return the diagonal as a vector.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Moments = tuple[Tensor, Tensor | None, int]


class UnsupportedLayer(Exception):
    """Raised by a helper's constructor when this particular layer cannot be preconditioned."""


class LayerHelper(ABC):
    """Adapter between one module and the activation preconditioner."""

    diagonal: bool = False

    def __init__(self, module: nn.Module) -> None:
        if not module.weight.requires_grad:
            raise UnsupportedLayer("weight is frozen")
        self.module = module
        bias = getattr(module, "bias", None)
        self.has_bias = bias is not None and bias.requires_grad

    @property
    def params(self) -> list[Tensor]:
        """The parameters whose gradients this helper rewrites."""
        return [self.module.weight, self.module.bias] if self.has_bias else [self.module.weight]

    @property
    @abstractmethod
    def in_features(self) -> int:
        """d_in, the length of one input row z (without the bias coordinate)."""

    @property
    def dim(self) -> int:
        """Side of Σ: d_in, plus one when the bias is preconditioned with its weight."""
        return self.in_features + int(self.has_bias)

    @abstractmethod
    def moments(self, x: Tensor) -> Moments:
        """Statistics ``(S, s, n)`` of the layer input ``x`` of one forward pass, in fp32."""

    def covariance(self, second: Tensor, first: Tensor | None, n: int) -> Tensor:
        """Σ of the bias-extended rows, shape (dim, dim), from pooled statistics."""
        n = max(n, 1)
        if not self.has_bias:
            return second / n
        d = self.in_features
        sigma = second.new_empty(d + 1, d + 1)
        sigma[:d, :d] = second / n
        sigma[:d, d] = first / n
        sigma[d, :d] = first / n
        sigma[d, d] = 1.0
        return sigma

    def weight_grad_matrix(self) -> Tensor:
        """The weight gradient as a (d_out, d_in) matrix."""
        return self.module.weight.grad.reshape(self.module.weight.shape[0], -1)

    def grad_matrix(self) -> Tensor | None:
        """G, shape (d_out, dim), or None when the layer received no gradient this step."""
        if self.module.weight.grad is None:
            return None
        g = self.weight_grad_matrix()
        if self.has_bias:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            g = torch.cat([g, bias_grad.reshape(-1, 1)], dim=1)
        return g

    def set_grad_matrix(self, m: Tensor) -> None:
        """Write the preconditioned M (d_out, dim) back into ``.grad``."""
        weight = self.module.weight
        d = self.in_features
        weight.grad.copy_(m[:, :d].reshape(weight.shape))
        if self.has_bias:
            if self.module.bias.grad is None:
                self.module.bias.grad = torch.zeros_like(self.module.bias)
            self.module.bias.grad.copy_(m[:, d])


def _dense_moments(rows: Tensor) -> Moments:
    """(ZᵀZ, Σ_i z_i, n) of rows Z (n, d), in fp32 (fp64 for fp64 inputs) with autocast off."""
    with torch.autocast(device_type=rows.device.type, enabled=False):
        z = rows.detach().to(torch.promote_types(rows.dtype, torch.float32))
        return z.T @ z, z.sum(dim=0), z.shape[0]


class LinearHelper(LayerHelper):
    """``nn.Linear`` with any number of leading dimensions: rows are ``x.reshape(-1, d_in)``."""

    @property
    def in_features(self) -> int:
        return self.module.in_features

    def moments(self, x: Tensor) -> Moments:
        return _dense_moments(x.reshape(-1, self.in_features))


class ConvHelper(LayerHelper):
    """``nn.Conv1d`` / ``nn.Conv2d``: rows are the im2col patches (one per output position).

    With ``C`` input channels and a ``k_1 × k_2`` kernel, ``z ∈ R^{C k_1 k_2}`` and the weight
    gradient reshaped to ``(C_out, C k_1 k_2)`` is the ``G`` of the equivalent linear layer.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.groups != 1:
            raise UnsupportedLayer(f"grouped convolution (groups={module.groups})")
        if module.padding_mode != "zeros":
            raise UnsupportedLayer(f"padding_mode={module.padding_mode!r}")
        self.is_1d = isinstance(module, nn.Conv1d)

        def as_2d(values: tuple[int, ...], height: int) -> tuple[int, int]:
            """A Conv1d is a Conv2d over a height-1 image (kernel/stride/dilation 1, padding 0)."""
            return (height, values[0]) if self.is_1d else tuple(values)

        self.kernel_size = as_2d(module.kernel_size, 1)
        self.stride = as_2d(module.stride, 1)
        self.dilation = as_2d(module.dilation, 1)
        padding = module.padding
        if padding == "valid":
            padding = (0,) * len(module.kernel_size)
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
            if any(t % 2 for t in totals):
                raise UnsupportedLayer("padding='same' with asymmetric padding")
            padding = tuple(t // 2 for t in totals)
        self.padding = as_2d(padding, 0)

    @property
    def in_features(self) -> int:
        return self.module.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def moments(self, x: Tensor) -> Moments:
        if self.is_1d:
            x = x.unsqueeze(-2)
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        return _dense_moments(patches.transpose(1, 2).reshape(-1, self.in_features))


class EmbeddingHelper(LayerHelper):
    """``nn.Embedding``: the input is a one-hot row, so Σ is diagonal (token frequencies).

    Σ = diag(c_v / n) with ``c_v`` the count of token ``v`` among the ``n`` looked-up indices;
    a V × V matrix is never formed. In the linear convention ``G = W.gradᵀ`` (d × V), so
    ``M = G P`` scales row ``v`` of ``W.grad`` by ``P_vv``.
    """

    diagonal = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.sparse:
            raise UnsupportedLayer("sparse gradients")
        self.has_bias = False

    @property
    def in_features(self) -> int:
        return self.module.num_embeddings

    def moments(self, x: Tensor) -> Moments:
        counts = torch.bincount(x.detach().reshape(-1), minlength=self.in_features)
        return counts.float(), None, x.numel()

    def covariance(self, second: Tensor, first: Tensor | None, n: int) -> Tensor:
        return second / max(n, 1)

    def weight_grad_matrix(self) -> Tensor:
        return self.module.weight.grad.T

    def set_grad_matrix(self, m: Tensor) -> None:
        self.module.weight.grad.copy_(m.T)


HELPERS: dict[type[nn.Module], type[LayerHelper]] = {
    nn.Linear: LinearHelper,
    nn.Conv1d: ConvHelper,
    nn.Conv2d: ConvHelper,
    nn.Embedding: EmbeddingHelper,
}


def helper_for(module: nn.Module) -> LayerHelper | None:
    """The helper for ``module``'s kind (nearest registered base class), or None if unknown.

    Raises :class:`UnsupportedLayer` when the kind is known but this instance is not supported.
    """
    for cls in type(module).__mro__:
        if cls in HELPERS:
            return HELPERS[cls](module)
    return None
