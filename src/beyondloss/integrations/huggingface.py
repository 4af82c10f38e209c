"""DoPr in a HuggingFace ``transformers.Trainer``.

The Trainer builds its optimizer from parameter groups, but DoPr needs the model (its
activation preconditioner hooks every layer's forward). Two recipes give it the model and keep
everything else — the LR scheduler, gradient accumulation, clipping, checkpoints — the
Trainer's own:

* :class:`DoPrTrainer`, a ``Trainer`` whose ``create_optimizer`` builds DoPr over the model the
  Trainer is about to train, when the Trainer would build its own optimizer. Preferred: it also
  works with ``model_init`` and hyperparameter search, which reject ``optimizers=``.
* ``Trainer(..., optimizers=(dopr_from_args(model, args), None))``: no subclass; the ``None``
  lets the Trainer create its scheduler (``args.lr_scheduler_type``, warmup) on DoPr.

Both read the learning rate, weight decay and Adam betas/epsilon from ``TrainingArguments``, so
``args`` stays the one place hyperparameters are set (``args.optim`` is ignored: DoPr is the
optimizer; its gradient preconditioner is chosen by ``base``), and both give DoPr the Trainer's
own two parameter groups (weight decay on the parameters of
``Trainer.get_decay_parameter_names``, none on biases and norm gains; frozen parameters left
out), so with activation preconditioning off DoPr is the Trainer's AdamW.

On transformers 5, whose Trainer accepts optimizer *factories*, a third way needs no import
from here: ``Trainer(..., optimizer_cls_and_kwargs=(lambda: DoPr, {"lr": 1e-3}))`` makes the
Trainer call ``DoPr(model, lr=1e-3)``. It takes only the keyword arguments given (nothing from
``args``) and applies one weight decay (DoPr's, 0 unless given) to every parameter.
``(DoPr, {...})``, the class itself, does not work: the Trainer then passes parameter groups,
which DoPr refuses with a ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from beyondloss.optim import DoPr

try:
    from transformers import Trainer, TrainingArguments
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "beyondloss.integrations.huggingface needs transformers: pip install 'beyondloss[hf]'"
    ) from error

__all__ = [
    "DoPrTrainer",
    "decay_parameter_names",
    "dopr_from_args",
    "dopr_kwargs_from_args",
    "trainer_parameter_groups",
]

ADAM_BASES = ("adamw", "adam")


def dopr_kwargs_from_args(args: TrainingArguments, base: str = "adamw") -> dict[str, Any]:
    """DoPr keyword arguments equivalent to what ``args`` would give the Trainer's AdamW.

    ``learning_rate`` and ``weight_decay`` always; ``adam_beta1/2`` and ``adam_epsilon`` only for
    the Adam bases (SGD and Muon take no betas). Which parameters decay is not a keyword
    argument: :func:`dopr_from_args` passes the Trainer's groups
    (:func:`trainer_parameter_groups`) as ``params=``.
    """
    kwargs: dict[str, Any] = {
        "base": base,
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
    }
    if base in ADAM_BASES:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
        kwargs["eps"] = args.adam_epsilon
    return kwargs


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the Trainer's AdamW decays: ``Trainer.get_decay_parameter_names``.

    The Trainer's own rule of the installed transformers, called without a Trainer (its body
    uses no Trainer state in the 4.x and 5.x versions checked). ``DoPrTrainer`` calls
    ``self.get_decay_parameter_names`` instead, so an override in a subclass is followed.
    """
    return list(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def trainer_parameter_groups(
    model: nn.Module, weight_decay: float, decay_names: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """The Trainer's parameter groups: ``decay_names`` at ``weight_decay``, the rest at 0.

    As in ``Trainer.create_optimizer``: trainable parameters only, in ``named_parameters``
    order; ``decay_names`` defaults to :func:`decay_parameter_names`. An empty group is
    dropped (DoPr needs at least one parameter overall, not per group).
    """
    names = set(decay_parameter_names(model) if decay_names is None else decay_names)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n in names], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in names], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def dopr_from_args(
    model: nn.Module,
    args: TrainingArguments,
    *,
    decay_names: Iterable[str] | None = None,
    **dopr_kwargs: Any,
) -> DoPr:
    """DoPr over ``model`` with hyperparameters from ``args``; ``dopr_kwargs`` override them.

    ``dopr_kwargs`` may hold any :class:`~beyondloss.optim.DoPr` argument (``base``,
    ``damping``, ``cov_every``, ``activation_preconditioning`` ...). Unless it holds
    ``params``, DoPr gets the Trainer's groups (:func:`trainer_parameter_groups`): weight decay
    (``args.weight_decay``, or a ``weight_decay`` given here) on ``decay_names`` — default the
    Trainer's rule, :func:`decay_parameter_names` — and none on the other parameters.
    """
    base = dopr_kwargs.pop("base", "adamw")
    kwargs = dopr_kwargs_from_args(args, base if isinstance(base, str) else "")
    kwargs["base"] = base
    kwargs.update(dopr_kwargs)
    if "params" not in kwargs:
        kwargs["params"] = trainer_parameter_groups(model, kwargs["weight_decay"], decay_names)
    return DoPr(model, **kwargs)


class DoPrTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DoPr instead of its own AdamW.

    Takes every ``Trainer`` argument plus ``dopr_kwargs`` (passed to :func:`dopr_from_args`).
    DoPr gets the parameter groups the Trainer's AdamW would get, from
    ``self.get_decay_parameter_names`` (so a subclass that overrides it is followed). Only
    optimizer creation changes: the scheduler (``lr_scheduler_type``, warmup) is the
    Trainer's, stepping DoPr's ``param_groups``; checkpoints save and restore DoPr's
    ``state_dict`` (preconditioner statistics included) like any optimizer's. An optimizer
    passed through ``optimizers=`` still wins, as in the Trainer.
    """

    def __init__(self, *args: Any, dopr_kwargs: Mapping[str, Any] | None = None, **kwargs: Any):
        self.dopr_kwargs = dict(dopr_kwargs or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> DoPr:
        """Build DoPr over ``model`` (the Trainer's model by default) unless one exists.

        The ``model`` argument is what newer Trainers pass when optimizer creation is delayed
        until after wrapping (FSDP); older ones call this without it.
        """
        if self.optimizer is None:
            target = self.model if model is None else model
            decay_names = self.get_decay_parameter_names(target)
            self.optimizer = dopr_from_args(
                target, self.args, decay_names=decay_names, **self.dopr_kwargs
            )
        return self.optimizer
