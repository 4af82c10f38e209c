"""Build an optimizer for a model from a short name, as used on the command line and in studies."""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZER_NAMES = ("adamw", "dopr-adamw", "muon", "dopr-muon", "sgd", "dopr-sgd")


def make_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) over ``model``'s parameters."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
