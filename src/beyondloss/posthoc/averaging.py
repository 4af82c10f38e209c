"""Weight averaging along training: SWA (uniform) and EMA (exponential) of model snapshots.

Both keep one averaged copy of the model, updated online from snapshots ``θ_e`` passed to
``update(model, epoch)`` (end-of-epoch weights when used by the tracker). Only updates with
``epoch >= start_epoch`` are folded in; with ``n`` snapshots ``θ_1..θ_n`` folded so far:

    SWA:  θ̄_n = (1/n) Σ_{k=1..n} θ_k        (online: θ̄_n = θ̄_{n-1} + (θ_n − θ̄_{n-1}) / n)
    EMA:  θ̃_1 = θ_1,  θ̃_n = d_n · θ̃_{n-1} + (1 − d_n) · θ_n   (decay d ∈ [0, 1))
          d_n = d without warmup (no bias correction: the first snapshot carries d^{n-1});
          d_n = min(d, n / (n + 9)) with ``warmup=True`` (the (1 + k)/(10 + k) rule of k = n − 1
          snapshots already folded, as TensorFlow's ExponentialMovingAverage with num_updates),
          so early snapshots fade as fast as a short average's

The per-step EMA of a study (:class:`~beyondloss.evaluation.StepAverageEvaluator`) folds the
weights after every optimizer step, with warmup; the per-epoch one folds end-of-epoch weights.

The averaging is :class:`torch.optim.swa_utils.AveragedModel` on the parameters; buffers are
copied from the latest snapshot. An averaged network has no BatchNorm statistics of its own,
so when the model has BatchNorm layers they are recomputed on ``bn_loader`` after every
update (:func:`torch.optim.swa_utils.update_bn`: one forward pass in train mode with a
cumulative running average); a BatchNorm model without ``bn_loader`` is refused.

Rebuilding a model: ``state_dict()["module"]`` is a plain state dict of the model's class, so
``model.load_state_dict(averager.state_dict()["module"])`` turns a fresh model into the
averaged one. To rebuild the average at an earlier epoch ``t``, either keep that state (the
tracker can, see :class:`beyondloss.posthoc.tracker.PosthocTracker`) or replay: a fresh
averager updated with the saved end-of-epoch checkpoints ``start_epoch..t`` in order gives
the same weights (SWA exactly, EMA up to float rounding).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn


def ema_kind(decay: float) -> str:
    """Kind name of the EMA with ``decay``, e.g. ``0.9 → "ema0.9"``."""
    return f"ema{decay:g}"


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm layer (1d, 2d, 3d, lazy or sync)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


class WeightAverage(ABC):
    """An online average of model snapshots; :class:`SWA` and :class:`EMA` fix the rule.

    Parameters
    ----------
    start_epoch:
        First epoch folded into the average; updates with a smaller epoch are ignored. The
        default 0 folds every update (the training loop numbers epochs from 1).
    bn_loader:
        Iterable of input batches (tensors, or tuples whose first item is the input) used to
        recompute BatchNorm statistics of the averaged model; required when it has BatchNorm.
    """

    def __init__(self, start_epoch: int = 0, bn_loader: Iterable[Any] | None = None) -> None:
        self.start_epoch = start_epoch
        self.bn_loader = bn_loader
        self._averaged: AveragedModel | None = None

    @abstractmethod
    def _wrap(self, model: nn.Module) -> AveragedModel:
        """A fresh (empty) :class:`AveragedModel` around a copy of ``model``."""

    @property
    def n_averaged(self) -> int:
        """Number of snapshots folded into the average so far."""
        return 0 if self._averaged is None else int(self._averaged.n_averaged.item())

    @property
    def module(self) -> nn.Module:
        """The averaged network (same class as the model, kept in eval mode); raises before
        the first snapshot."""
        if self._averaged is None:
            raise RuntimeError(
                f"no snapshot averaged yet (start_epoch={self.start_epoch}); call update() first"
            )
        return self._averaged.module

    def update(self, model: nn.Module, epoch: int, recompute_bn: bool = True) -> bool:
        """Fold ``model``'s current weights into the average if ``epoch >= start_epoch``.

        Returns whether the snapshot was folded in. With ``recompute_bn`` (default) the
        BatchNorm statistics of the averaged model are recomputed right away; pass ``False``
        when updating every optimizer step and call :meth:`recompute_bn` before evaluating.
        """
        if epoch < self.start_epoch:
            return False
        if self._averaged is None:
            if has_batchnorm(model) and self.bn_loader is None:
                raise ValueError(
                    "the model has BatchNorm layers: pass bn_loader so the averaged model's "
                    "statistics can be recomputed"
                )
            self._averaged = self._wrap(model).eval()
        with torch.no_grad():
            self._averaged.update_parameters(model)
        if recompute_bn:
            self.recompute_bn()
        return True

    def recompute_bn(self) -> None:
        """Recompute BatchNorm statistics of the averaged model on ``bn_loader`` (no-op without
        BatchNorm); the inputs are moved to the averaged model's device."""
        module = self.module
        if self.bn_loader is None or not has_batchnorm(module):
            return
        device = next(module.parameters()).device
        with torch.no_grad():
            update_bn(self.bn_loader, module, device=device)

    def state_dict(self) -> dict[str, Any]:
        """``{"module": averaged model state dict or None, "n_averaged": int}``."""
        return {
            "module": None if self._averaged is None else self._averaged.module.state_dict(),
            "n_averaged": self.n_averaged,
        }

    def load_state_dict(self, state: dict[str, Any], template: nn.Module) -> None:
        """Restore from :meth:`state_dict`; ``template`` is any model of the same architecture
        (it is copied, not modified) on the device the average should live on."""
        if state["module"] is None:
            self._averaged = None
            return
        self._averaged = self._wrap(template).eval()
        self._averaged.module.load_state_dict(state["module"])
        self._averaged.n_averaged.fill_(int(state["n_averaged"]))


class SWA(WeightAverage):
    """Stochastic weight averaging: the uniform mean of the snapshots since ``start_epoch``."""

    def _wrap(self, model: nn.Module) -> AveragedModel:
        return AveragedModel(model, use_buffers=False)

    def __repr__(self) -> str:
        return f"SWA(start_epoch={self.start_epoch}, n_averaged={self.n_averaged})"


class EMA(WeightAverage):
    """Exponential moving average of the snapshots since ``start_epoch`` with decay ``d``.

    ``decay`` is per :meth:`update` call (per epoch when driven by the tracker, per optimizer
    step by :class:`~beyondloss.evaluation.StepAverageEvaluator`): a snapshot ``k`` updates old
    has weight ``(1 − d) d^k``; the effective window is ``1 / (1 − d)`` updates. With
    ``warmup`` the decay of the ``n``-th snapshot is ``min(d, n / (n + 9))`` (module
    docstring).
    """

    def __init__(
        self,
        decay: float,
        start_epoch: int = 0,
        bn_loader: Iterable[Any] | None = None,
        warmup: bool = False,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        super().__init__(start_epoch=start_epoch, bn_loader=bn_loader)
        self.decay = decay
        self.warmup = warmup

    def _wrap(self, model: nn.Module) -> AveragedModel:
        average = _warmed_ema(self.decay) if self.warmup else get_ema_multi_avg_fn(self.decay)
        return AveragedModel(model, multi_avg_fn=average, use_buffers=False)

    def __repr__(self) -> str:
        return (
            f"EMA(decay={self.decay}, warmup={self.warmup}, start_epoch={self.start_epoch}, "
            f"n_averaged={self.n_averaged})"
        )


def _warmed_ema(decay: float) -> Any:
    """``AveragedModel``'s ``multi_avg_fn`` of the EMA with decay warmup: with ``k`` snapshots
    folded (``k >= 1``; the first is copied), fold the next with ``min(decay, (1+k)/(10+k))``."""

    @torch.no_grad()
    def fold(averaged: list[torch.Tensor], current: list[torch.Tensor], k: torch.Tensor) -> None:
        folded = int(k)
        step_decay = min(decay, (1 + folded) / (10 + folded))
        torch._foreach_lerp_(averaged, current, 1.0 - step_decay)

    return fold
