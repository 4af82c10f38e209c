"""DoPr: double preconditioning = activation preconditioner, then a gradient preconditioner.

Algorithm (one step, per supported layer; other parameters skip the first line)::

    M = G (Σ + λ I)⁻¹                    activation preconditioning (AP), see .preconditioner
    D = GP(M)                            Adam moments on M; Muon momentum + Newton–Schulz on M;
                                         SGD momentum on M — exactly as on a raw gradient
    θ ← (1 − η λ_wd) θ − η D             decoupled weight decay

``base="muon"`` follows the usual convention: ``torch.optim.Muon`` (with
``adjust_lr_fn="match_rms_adamw"``, so one learning rate and weight decay serve both parts) for
the 2-D weights of hidden ``nn.Linear`` layers, and AdamW for everything Muon cannot take:
biases, embeddings, convolutions, norm gains, shared weights and the output head (the last
``nn.Linear`` registered, plus any module matching ``adamw_modules``). AP still applies to every
supported weight (and its bias column) before either.

With ``activation_preconditioning=False`` the optimizer is exactly its base GP; the baselines of
a study use it so that both arms run the same code and differ only by AP.
"""

from __future__ import annotations

import fnmatch
from collections import ChainMap, Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from beyondloss.optim.preconditioner import (
    DEFAULT_COV_EVERY,
    DEFAULT_DAMPING,
    DEFAULT_EMA_DECAY,
    DEFAULT_INVERSE_EVERY,
    ActivationPreconditioner,
)

BASES = ("adamw", "adam", "sgd", "muon")


def muon_parameter_split(
    model: nn.Module, adamw_modules: Sequence[str] = ()
) -> tuple[list[Tensor], list[Tensor]]:
    """(Muon params, AdamW params): hidden Linear weights vs everything else (see module doc)."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hidden = {
        id(m.weight)
        for n, m in linears[:-1]
        if not any(fnmatch.fnmatchcase(n, pattern) for pattern in adamw_modules)
    }
    muon, adamw = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        takes_muon = id(p) in hidden and p.ndim == 2 and uses[id(p)] == 1
        (muon if takes_muon else adamw).append(p)
    return muon, adamw


class DoPr(Optimizer):
    """Double preconditioning: AP on every supported layer, then the base optimizer.

    Parameters
    ----------
    model:
        The model (not its parameters: AP reads each layer's inputs through hooks).
    base:
        ``"adamw"``, ``"adam"``, ``"sgd"`` (momentum 0.9 unless given), ``"muon"``, or an
        ``Optimizer`` class, constructed as ``base(params, lr=lr, weight_decay=weight_decay,
        **base_kwargs)``.
    lr, weight_decay:
        η and λ_wd; decoupled for adamw, sgd and muon (``"adam"`` keeps torch's L2 coupling).
    damping, damping_mode, ema_decay, cov_every, inverse_every, exclude:
        Passed to :class:`ActivationPreconditioner`.
    activation_preconditioning:
        ``False`` gives the base optimizer alone (same code path, no hooks).
    adamw_modules:
        For ``base="muon"``: module-name patterns whose weights go to AdamW instead of Muon.
    """

    def __init__(
        self,
        model: nn.Module,
        base: str | type[Optimizer] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        damping: float = DEFAULT_DAMPING,
        damping_mode: str = "trace_over_dim",
        ema_decay: float = DEFAULT_EMA_DECAY,
        cov_every: int = DEFAULT_COV_EVERY,
        inverse_every: int = DEFAULT_INVERSE_EVERY,
        exclude: Sequence[str] = (),
        activation_preconditioning: bool = True,
        adamw_modules: Sequence[str] = (),
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "DoPr needs the model itself (it reads layer inputs through hooks), "
                f"got {type(model).__name__}"
            )
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(base, str) and base not in BASES:
            raise ValueError(
                f"Invalid base {base!r}; expected one of {BASES} or an Optimizer class"
            )
        if not isinstance(base, str) and not (
            isinstance(base, type) and issubclass(base, Optimizer)
        ):
            raise ValueError(
                f"Invalid base {base!r}; expected one of {BASES} or an Optimizer class"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")

        self.preconditioner = (
            ActivationPreconditioner(
                model, damping, damping_mode, ema_decay, cov_every, inverse_every, exclude
            )
            if activation_preconditioning
            else None
        )
        self.base = base if isinstance(base, str) else base.__name__
        self.base_optimizers = self._build_base(
            model, base, params, lr, weight_decay, adamw_modules, base_kwargs
        )
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._share_groups()

    @staticmethod
    def _build_base(
        model: nn.Module,
        base: str | type[Optimizer],
        params: list[Tensor],
        lr: float,
        weight_decay: float,
        adamw_modules: Sequence[str],
        kwargs: dict[str, Any],
    ) -> list[Optimizer]:
        if not isinstance(base, str):
            return [base(params, lr=lr, weight_decay=weight_decay, **kwargs)]
        if base == "adamw":
            return [torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)]
        if base == "adam":
            return [torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kwargs)]
        if base == "sgd":
            kwargs = {"momentum": 0.9, **kwargs}
            sgd = torch.optim.SGD(params, lr=lr, weight_decay=0.0, **kwargs)
            for group in sgd.param_groups:
                group["dopr_decoupled_weight_decay"] = weight_decay
            return [sgd]
        muon_params, adamw_params = muon_parameter_split(model, adamw_modules)
        optimizers: list[Optimizer] = []
        if muon_params:
            muon_kwargs = {"adjust_lr_fn": "match_rms_adamw", **kwargs}
            optimizers.append(
                torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, **muon_kwargs)
            )
        if adamw_params:
            optimizers.append(torch.optim.AdamW(adamw_params, lr=lr, weight_decay=weight_decay))
        return optimizers

    def _share_groups(self) -> None:
        """Expose the base optimizers' group dicts as ours, so LR schedulers reach them."""
        self.param_groups = [g for opt in self.base_optimizers for g in opt.param_groups]
        self.state = ChainMap(*(opt.state for opt in self.base_optimizers))
        self._groups_shared = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_groups_shared", False):
            raise RuntimeError(
                "DoPr builds its parameter groups from the model; rebuild it instead"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Precondition the gradients by activations, then take one base-optimizer step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.preconditioner is not None:
            self.preconditioner.precondition()
        for group in self.param_groups:
            decay = group.get("dopr_decoupled_weight_decay", 0.0)
            if decay:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - group["lr"] * decay)
        for opt in self.base_optimizers:
            opt.step()
        return loss

    def describe(self) -> str:
        """Which layers are activation-preconditioned, and which optimizer takes each parameter."""
        lines = [f"DoPr(base={self.base}) with {len(self.base_optimizers)} base optimizer(s):"]
        for opt in self.base_optimizers:
            n = sum(p.numel() for g in opt.param_groups for p in g["params"])
            lines.append(f"  {type(opt).__name__}: {n} parameters")
        if self.preconditioner is None:
            lines.append("activation preconditioning: off")
        else:
            lines.append(self.preconditioner.describe())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": [opt.state_dict() for opt in self.base_optimizers],
            "preconditioner": None
            if self.preconditioner is None
            else self.preconditioner.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["base"]) != len(self.base_optimizers):
            raise ValueError("saved state has a different number of base optimizers")
        if (state_dict["preconditioner"] is None) != (self.preconditioner is None):
            raise ValueError(
                "saved state and this optimizer disagree on activation_preconditioning"
            )
        for opt, saved in zip(self.base_optimizers, state_dict["base"], strict=True):
            opt.load_state_dict(saved)
        if self.preconditioner is not None:
            self.preconditioner.load_state_dict(state_dict["preconditioner"])
        self._share_groups()
