"""Optimizers: DoPr (activation preconditioning, then any gradient preconditioner)."""

from beyondloss.optim.factory import OPTIMIZER_NAMES, make_optimizer

__all__ = ["OPTIMIZER_NAMES", "make_optimizer"]
