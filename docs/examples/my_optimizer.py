"""An outside optimizer for beyondloss: SGD with Nesterov momentum."""

import torch


def make_nesterov(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The factory beyondloss calls: ``(model, lr, weight_decay) -> Optimizer``."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
