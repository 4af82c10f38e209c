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
optimizer; its gradient preconditioner is chosen by ``base``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from beyondloss.optim import DoPr

try:
    from transformers import Trainer, TrainingArguments
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "beyondloss.integrations.huggingface needs transformers: pip install 'beyondloss[hf]'"
    ) from error

__all__ = ["DoPrTrainer", "dopr_from_args", "dopr_kwargs_from_args"]

ADAM_BASES = ("adamw", "adam")


def dopr_kwargs_from_args(args: TrainingArguments, base: str = "adamw") -> dict[str, Any]:
    """DoPr keyword arguments equivalent to what ``args`` would give the Trainer's AdamW.

    ``learning_rate`` and ``weight_decay`` always; ``adam_beta1/2`` and ``adam_epsilon`` only for
    the Adam bases (SGD and Muon take no betas). Note one difference: the Trainer exempts biases
    and norm gains from weight decay, DoPr (built from the model alone) decays every parameter,
    so with ``weight_decay > 0`` the two are not the same optimizer.
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


def dopr_from_args(model: nn.Module, args: TrainingArguments, **dopr_kwargs: Any) -> DoPr:
    """DoPr over ``model`` with hyperparameters from ``args``; ``dopr_kwargs`` override them.

    ``dopr_kwargs`` may hold any :class:`~beyondloss.optim.DoPr` argument (``base``,
    ``damping``, ``cov_every``, ``activation_preconditioning`` ...).
    """
    base = dopr_kwargs.pop("base", "adamw")
    kwargs = dopr_kwargs_from_args(args, base if isinstance(base, str) else "")
    kwargs["base"] = base
    kwargs.update(dopr_kwargs)
    return DoPr(model, **kwargs)


class DoPrTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DoPr instead of its own AdamW.

    Takes every ``Trainer`` argument plus ``dopr_kwargs`` (passed to :func:`dopr_from_args`).
    Only optimizer creation changes: the scheduler (``lr_scheduler_type``, warmup) is the
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
            self.optimizer = dopr_from_args(target, self.args, **self.dopr_kwargs)
        return self.optimizer
