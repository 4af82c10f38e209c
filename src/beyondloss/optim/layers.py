"""One helper per layer kind: how its inputs become rows z and its gradient becomes G.

The activation preconditioner only talks to the :class:`LayerHelper` interface; this module is
the one place that knows what a ``Linear``, a ``Conv`` or an ``Embedding`` is.

Conventions (shared by every helper)
------------------------------------
* A layer computes ``y = W z (+ b)`` for input rows ``z ∈ R^{d_in}``; its gradient in that
  convention is ``G ∈ R^{d_out × dim}`` where ``dim = d_in + 1`` when the layer has a bias
  (the bias is the weight of a constant input 1, so it is preconditioned together with ``W``).
  Whether the bias is trained is read at every step (``requires_grad`` and a gradient), so a
  bias frozen or unfrozen after the optimizer was built is handled like torch optimizers do.
* Σ is a list of diagonal blocks over contiguous ranges of the ``dim`` coordinates
  (:func:`~beyondloss.optim.linalg.block_bounds`); the bias coordinate is the last one.
  ``moments(x, columns)`` returns the sufficient statistics of one forward pass:
  ``(S, s, n)`` with ``S`` the blocks ``Z_bᵀ Z_b`` over the weight ``columns`` (dense kinds) or
  the per-coordinate counts (diagonal kinds), ``s = Σ_i z_i`` and ``n`` the number of rows.
  They add up across forwards and ranks.
* ``covariance(S, s, n, bounds)`` turns pooled statistics into the blocks of the uncentered
  second moment of the (bias-extended) rows, ``Σ = (1/n) Σ_i z̃_i z̃_iᵀ`` with ``z̃ = [z; 1]``:
  the block holding the bias coordinate is ``[[S_b/n, s_b/n], [s_bᵀ/n, 1]]``.
* Under FSDP2 a parameter and its gradient are ``DTensor`` shards of rows (output features);
  ``G`` and ``M`` are then the rank's local rows, and ``M_local = G_local P`` is exact because
  P acts on the input side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Moments = tuple[list[Tensor], Tensor | None, int]
Bounds = list[tuple[int, int]]


class UnsupportedLayer(Exception):
    """Raised by a helper's constructor when this particular layer cannot be preconditioned."""


def local(tensor: Tensor) -> Tensor:
    """The rank's local shard of a ``DTensor`` (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class LayerHelper(ABC):
    """Adapter between one module and the activation preconditioner."""

    diagonal: bool = False

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module._parameters.get("weight"), nn.Parameter):
            raise UnsupportedLayer(
                "weight is computed from other parameters (weight_norm, spectral_norm or a "
                "parametrization), so no gradient reaches it"
            )
        self.module = module
        bias = module._parameters.get("bias")
        self.bias: nn.Parameter | None = bias if isinstance(bias, nn.Parameter) else None

    @property
    def has_bias(self) -> bool:
        """Whether Σ carries the bias coordinate (the layer has a bias parameter)."""
        return self.bias is not None

    @property
    def params(self) -> list[Tensor]:
        """The parameters whose gradients this helper rewrites."""
        weight = self.module.weight
        return [weight] if self.bias is None else [weight, self.bias]

    def trains_bias(self) -> bool:
        """Whether the bias is trained this step: it requires grad and received a gradient."""
        return self.bias is not None and self.bias.requires_grad and self.bias.grad is not None

    @property
    @abstractmethod
    def in_features(self) -> int:
        """d_in, the length of one input row z (without the bias coordinate)."""

    @property
    def dim(self) -> int:
        """Side of Σ: d_in, plus one when the layer has a bias."""
        return self.in_features + int(self.has_bias)

    def columns(self, bounds: Bounds) -> Bounds:
        """The blocks ``bounds`` of Σ restricted to the weight columns (bias coordinate off)."""
        d = self.in_features
        return [(start, min(stop, d)) for start, stop in bounds if start < d]

    @abstractmethod
    def moments(self, x: Tensor, columns: Bounds) -> Moments:
        """Statistics ``(S, s, n)`` of the layer input ``x`` of one forward pass, in fp32."""

    def covariance(
        self, second: list[Tensor], first: Tensor | None, n: int, bounds: Bounds
    ) -> list[Tensor]:
        """The blocks of Σ of the bias-extended rows over ``bounds``, from pooled statistics."""
        n = max(n, 1)
        blocks = [block / n for block in second]
        if not self.has_bias:
            return blocks
        d = self.in_features
        start = bounds[-1][0]
        side = d + 1 - start
        last = first.new_empty(side, side)
        if start < d:
            last[:-1, :-1] = blocks.pop()
            last[:-1, -1] = first[start:] / n
            last[-1, :-1] = first[start:] / n
        last[-1, -1] = 1.0
        return [*blocks, last]

    def without_bias(self, blocks: list[Tensor]) -> list[Tensor]:
        """Σ of the weight columns alone: the bias row and column removed from the last block."""
        if not self.has_bias:
            return blocks
        last = blocks[-1][:-1, :-1]
        return [*blocks[:-1], last] if last.numel() else blocks[:-1]

    def weight_grad_matrix(self) -> Tensor:
        """The weight gradient as a (d_out, d_in) matrix (local rows under FSDP2)."""
        return local(self.module.weight.grad).flatten(1)  # (0, d_in) on an empty shard

    def grad_matrix(self, with_bias: bool) -> Tensor | None:
        """G, shape (d_out, d_in [+1]), or None when the weight received no gradient."""
        if self.module.weight.grad is None:
            return None
        g = self.weight_grad_matrix()
        if with_bias:
            g = torch.cat([g, local(self.bias.grad).reshape(-1, 1)], dim=1)
        return g

    def set_grad_matrix(self, m: Tensor, with_bias: bool) -> None:
        """Write the preconditioned M back into ``.grad`` (the bias column iff ``with_bias``)."""
        grad = local(self.module.weight.grad)
        d = self.in_features
        grad.copy_(m[:, :d].reshape(grad.shape))
        if with_bias:
            local(self.bias.grad).copy_(m[:, d])


def _dense_moments(rows: Tensor, columns: Bounds) -> Moments:
    """(blocks Z_bᵀZ_b, Σ_i z_i, n) of rows Z (n, d) in fp32 (fp64 for fp64), autocast off."""
    with torch.autocast(device_type=rows.device.type, enabled=False):
        z = rows.detach().to(torch.promote_types(rows.dtype, torch.float32))
        if len(columns) == 1 and columns[0] == (0, z.shape[1]):
            second = [z.T @ z]
        else:
            second = [z[:, start:stop].T @ z[:, start:stop] for start, stop in columns]
        return second, z.sum(dim=0), z.shape[0]


def _transposed_grad(module: nn.Module, kind: str) -> Tensor:
    """``W.gradᵀ`` of a layer that stores W as (d_in, d_out) — which FSDP2 shards on its inputs,
    where P cannot act on a shard, so a sharded gradient is refused."""
    grad = module.weight.grad
    if local(grad) is not grad:
        raise NotImplementedError(
            f"activation preconditioning of a sharded (FSDP2) {kind} is not supported; leave "
            "it to the base optimizer with DoPr(..., exclude=[<its module name>])"
        )
    return grad.T


class LinearHelper(LayerHelper):
    """``nn.Linear`` with any number of leading dimensions: rows are ``x.reshape(-1, d_in)``."""

    @property
    def in_features(self) -> int:
        return self.module.in_features

    def moments(self, x: Tensor, columns: Bounds) -> Moments:
        return _dense_moments(x.reshape(-1, self.in_features), columns)


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

    def moments(self, x: Tensor, columns: Bounds) -> Moments:
        if self.is_1d:
            x = x.unsqueeze(-2)
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        return _dense_moments(patches.transpose(1, 2).reshape(-1, self.in_features), columns)


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

    @property
    def in_features(self) -> int:
        return self.module.num_embeddings

    def moments(self, x: Tensor, columns: Bounds) -> Moments:
        counts = torch.bincount(x.detach().reshape(-1), minlength=self.in_features)
        return [counts.float()], None, x.numel()

    def covariance(
        self, second: list[Tensor], first: Tensor | None, n: int, bounds: Bounds
    ) -> list[Tensor]:
        return [second[0] / max(n, 1)]

    def weight_grad_matrix(self) -> Tensor:
        return _transposed_grad(self.module, "nn.Embedding")

    def set_grad_matrix(self, m: Tensor, with_bias: bool) -> None:
        self.module.weight.grad.copy_(m.T)


class TransposedLinearHelper(LinearHelper):
    """A linear layer that stores its weight as (d_in, d_out) and computes ``y = x W + b``.

    HuggingFace's ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections)
    is one. Its rows are a Linear's; in the linear convention ``G = W.gradᵀ``, so ``M`` is
    written back transposed.
    """

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]

    def weight_grad_matrix(self) -> Tensor:
        return _transposed_grad(self.module, "transposed linear layer")

    def set_grad_matrix(self, m: Tensor, with_bias: bool) -> None:
        d = self.in_features
        self.module.weight.grad.copy_(m[:, :d].T)
        if with_bias:
            self.bias.grad.copy_(m[:, d])


HELPERS: dict[type[nn.Module], type[LayerHelper]] = {
    nn.Linear: LinearHelper,
    nn.Conv1d: ConvHelper,
    nn.Conv2d: ConvHelper,
    nn.Embedding: EmbeddingHelper,
}
"""Helper of each supported module class (a subclass uses its nearest registered base)."""

NAMED_HELPERS: dict[str, type[LayerHelper]] = {
    "transformers.pytorch_utils.Conv1D": TransposedLinearHelper,
}
"""Helpers of classes from optional packages, by ``module.qualname``, so none is imported."""


def register_helper(module_class: type[nn.Module], helper: type[LayerHelper]) -> None:
    """Precondition layers of ``module_class`` (and its subclasses) with ``helper``."""
    if not (isinstance(helper, type) and issubclass(helper, LayerHelper)):
        raise TypeError(f"helper must be a LayerHelper subclass, got {helper!r}")
    HELPERS[module_class] = helper


def helper_for(module: nn.Module) -> LayerHelper | None:
    """The helper for ``module``'s kind (nearest registered base class), or None if unknown.

    Raises :class:`UnsupportedLayer` when the kind is known but this instance is not supported.
    """
    for cls in type(module).__mro__:
        helper = HELPERS.get(cls) or NAMED_HELPERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if helper is not None:
            return helper(module)
    return None
