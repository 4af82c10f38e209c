"""Build an optimizer for a model from a short name, as used on the command line and in studies.

``"<base>"`` is the base gradient preconditioner alone and ``"dopr-<base>"`` adds activation
preconditioning; both are built by :class:`~beyondloss.optim.dopr.DoPr`, so the two arms of a
comparison run the same code and differ only by AP.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from beyondloss.optim.dopr import DoPr

OPTIMIZER_NAMES = (
    "adamw",
    "dopr-adamw",
    "muon",
    "dopr-muon",
    "sgd",
    "dopr-sgd",
    "signum",
    "dopr-signum",
    "adamuon",
    "dopr-adamuon",
)


def make_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float = 0.0, **dopr_kwargs: Any
) -> DoPr:
    """Optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) over ``model``'s parameters.

    ``dopr_kwargs`` (damping, cov_every, ...) reach the activation preconditioner of the
    ``dopr-*`` optimizers and are ignored by the plain ones.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}"
        )
    preconditioned = name.startswith("dopr-")
    base = name.removeprefix("dopr-")
    return DoPr(
        model,
        base=base,
        lr=lr,
        weight_decay=weight_decay,
        activation_preconditioning=preconditioned,
        **(dopr_kwargs if preconditioned else {}),
    )
