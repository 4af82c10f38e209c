"""Optimizers: DoPr (activation preconditioning, then any gradient preconditioner)."""

from beyondloss.optim.config import APConfig
from beyondloss.optim.dopr import DoPr, ParameterFate, muon_parameter_split
from beyondloss.optim.factory import OPTIMIZER_NAMES, make_optimizer
from beyondloss.optim.preconditioner import ActivationPreconditioner

__all__ = [
    "OPTIMIZER_NAMES",
    "APConfig",
    "ActivationPreconditioner",
    "DoPr",
    "ParameterFate",
    "make_optimizer",
    "muon_parameter_split",
]
