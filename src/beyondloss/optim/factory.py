"""Build an optimizer for a model from a short name, as used on the command line and in studies.

``"<base>"`` is the base gradient preconditioner alone and ``"dopr-<base>"`` adds activation
preconditioning; both are built by :class:`~beyondloss.optim.dopr.DoPr`, so the two arms of a
comparison run the same code and differ only by AP.

Any other optimizer gets into a study by reference (:mod:`beyondloss.references`): an installed
plugin's name (entry-point group :data:`OPTIMIZER_GROUP`), ``module:factory`` or
``path/to/file.py:factory``, where the factory is ``(model, lr, weight_decay) -> Optimizer``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from beyondloss.optim.dopr import DoPr
from beyondloss.references import canonical, check_callable, label, resolve

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


OPTIMIZER_GROUP = "beyondloss.optimizers"
"""Entry-point group of installed optimizer plugins (``name = "module:factory"``)."""

OptimizerFactory = Callable[[nn.Module, float, float], Optimizer]
"""``(model, lr, weight_decay) -> Optimizer``: a user's optimizer, as a study builds it."""

_LABEL = re.compile(r"[A-Za-z0-9_.+]+(-[A-Za-z0-9_.+]+)*")


def optimizer_factory(reference: str) -> OptimizerFactory:
    """The factory a plugin name or reference names; ``ValueError`` in one line if none."""
    found = resolve(reference, OPTIMIZER_GROUP, "optimizer", OPTIMIZER_NAMES)
    return check_callable(found, reference, "optimizer")


def parse_optimizer(item: str) -> tuple[str, str]:
    """``(label, reference)`` of one entry of a study's optimizers: a built-in name is its own
    label and reference; ``label=reference`` names a user optimizer; a bare reference is
    labelled by its factory's name (``mypkg.opt:make_lion`` → ``make_lion``). The reference is
    resolved now and kept canonical (absolute file path); ``ValueError`` in one line for a
    reference that does not resolve, or a label that is not a plain name or claims ``dopr-``."""
    if item in OPTIMIZER_NAMES:
        return item, item
    name, equals, reference = item.partition("=")
    if not equals:
        name, reference = label(item), item
    if not _LABEL.fullmatch(name):
        raise ValueError(f"optimizer name {name!r} must be letters, digits, '_', '.', '+', '-'")
    if name.startswith("dopr-") or name in OPTIMIZER_NAMES:
        raise ValueError(
            f"optimizer name {name!r} is DoPr's own; name your optimizer otherwise, e.g. "
            f"mine={reference}"
        )
    if reference in OPTIMIZER_NAMES:
        raise ValueError(f"give the built-in optimizer {reference!r} by its own name")
    optimizer_factory(reference)
    return name, canonical(reference)


def make_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float = 0.0, **dopr_kwargs: Any
) -> Optimizer:
    """Optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`, or a plugin name or reference, see
    :func:`optimizer_factory`) over ``model``'s parameters.

    ``dopr_kwargs`` (damping, cov_every, ...) reach the activation preconditioner of the
    ``dopr-*`` optimizers and are ignored by every other optimizer.
    """
    if name not in OPTIMIZER_NAMES:
        return optimizer_factory(name)(model, lr, weight_decay)
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
