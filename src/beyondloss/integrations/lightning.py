"""DoPr in PyTorch Lightning.

Lightning asks the ``LightningModule`` for its optimizer, and the module is the model, so the
whole recipe is::

    def configure_optimizers(self):
        return DoPr(self, lr=1e-3)

Lightning's automatic optimization then calls ``optimizer.step(closure)``; DoPr runs the
closure (forward, backward, gradient clipping) with grad enabled, so its forward hooks record
the layer inputs, then preconditions the fresh gradients and steps. Checkpoints
(``ModelCheckpoint``, ``fit(ckpt_path=...)``) save and restore DoPr's ``state_dict``, the
preconditioner's statistics included.

:func:`configure_dopr` only adds the one thing that is easy to get wrong: a per-step
(``interval="step"``) learning-rate scheduler over DoPr's ``param_groups``; Lightning's own
default interval is ``"epoch"``, which would stretch a warmup measured in steps over epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from beyondloss.optim import DoPr

__all__ = ["configure_dopr"]


def configure_dopr(
    module: nn.Module,
    scheduler: Callable[[DoPr], LRScheduler] | None = None,
    interval: str = "step",
    **dopr_kwargs: Any,
) -> DoPr | dict[str, Any]:
    """What ``configure_optimizers`` should return: DoPr over ``module``, plus a scheduler.

    Parameters
    ----------
    module:
        The ``LightningModule`` (pass ``self``) or the submodule to train.
    scheduler:
        Builds the LR scheduler from the optimizer, e.g.
        ``lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup)``; ``None`` for a constant
        learning rate.
    interval:
        ``"step"`` (default) or ``"epoch"``: when Lightning calls ``scheduler.step()``.
    dopr_kwargs:
        Passed to :class:`~beyondloss.optim.DoPr` (``base``, ``lr``, ``weight_decay``, ...).
    """
    if interval not in ("step", "epoch"):
        raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
    optimizer = DoPr(module, **dopr_kwargs)
    if scheduler is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler(optimizer), "interval": interval},
    }
