"""DoPr: double preconditioning = activation preconditioner, then a gradient preconditioner."""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from beyondloss.optim.bases import AdaMuon, Signum
from beyondloss.optim.config import APConfig
from beyondloss.optim.preconditioner import ActivationPreconditioner

BASES = ("adamw", "adam", "sgd", "muon", "signum", "adamuon")
MATRIX_BASES = {"muon": torch.optim.Muon, "adamuon": AdaMuon}
"""Bases that step hidden ``nn.Linear`` weights only (the rest goes to AdamW)."""
SGD_DECAY_KEY = "dopr_decoupled_weight_decay"
"""Param-group key of SGD's decoupled weight decay (torch's SGD only couples it as L2)."""


def muon_parameter_split(
    model: nn.Module, adamw_modules: Sequence[str] = ()
) -> tuple[list[Tensor], list[Tensor]]:
    """(Muon params, AdamW params): hidden Linear weights vs everything else (see ``DoPr``)."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hidden = {
        id(m.weight)
        for n, m in linears[:-1]
        if not any(fnmatch.fnmatchcase(n, pattern) for pattern in adamw_modules)
    }
    muon, adamw = [], []
    for p in model.parameters():
        takes_muon = id(p) in hidden and p.ndim == 2 and uses[id(p)] == 1
        (muon if takes_muon else adamw).append(p)
    return muon, adamw


def _groups(model: nn.Module, params: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Parameter groups as torch optimizers take them; ``None`` is every model parameter."""
    if params is None:
        return [{"params": list(model.parameters())}]
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of Tensors or dicts, got a Tensor")
    params = list(params)
    if not params:
        raise ValueError("DoPr got an empty parameter list")
    if not isinstance(params[0], dict):
        return [{"params": params}]
    groups = []
    for group in params:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        groups.append({**group, "params": tensors})
    return groups


class _RoutedState(MutableMapping):
    """``DoPr.state``: each parameter's state, kept by the base optimizer that owns it.

    Reading ``state[p]`` behaves as in torch (an empty dict is created on first access), but
    in the state of the optimizer that steps ``p``, so ``state_dict()`` stays consistent.
    """

    def __init__(self, optimizers: list[Optimizer]) -> None:
        self._optimizers = optimizers
        self._extra: defaultdict = defaultdict(dict)
        self.reroute()

    def reroute(self) -> None:
        self._owner = {
            p: opt for opt in self._optimizers for g in opt.param_groups for p in g["params"]
        }

    def _target(self, key: Any) -> MutableMapping:
        opt = self._owner.get(key) if isinstance(key, Tensor) else None
        return self._extra if opt is None else opt.state

    def __getitem__(self, key: Any) -> Any:
        return self._target(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._target(key)[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._target(key)[key]

    def __contains__(self, key: object) -> bool:
        return key in self._target(key)

    def __iter__(self) -> Iterator[Any]:
        for opt in self._optimizers:
            yield from opt.state
        yield from self._extra

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers) + len(self._extra)


@dataclass(frozen=True)
class ParameterFate:
    """How DoPr treats one parameter: which base optimizer steps it and whether AP applies."""

    name: str
    shape: tuple[int, ...] | None  # None while a lazy parameter is uninitialized
    trainable: bool
    base: str  # class name of the base optimizer, or "-" if the optimizer does not hold it
    preconditioning: str


class DoPr(Optimizer):
    r"""Double preconditioning: activation preconditioning, then a base gradient preconditioner.

    .. code-block:: text

        input: model with parameters θ, lr η, weight decay λ_wd, base GP (AdamW, Adam, SGD,
               Muon + AdamW, or an Optimizer class), AP settings (APConfig):
               γ damping, β ema_decay, c cov_every, r inverse_every, B max_block_size
        for step k = 0, 1, ...:
          for every supported layer ℓ (Linear, Conv1d/2d, Embedding) with gradient G_ℓ:
            if ℓ recorded inputs z̃ = [z; 1] since the last step:   # recording: k % c == 0,
              Σ_new = (1/n) Σ_i z̃_i z̃_iᵀ   (all-reduced over ranks)    # or ℓ has no Σ yet
              Σ_ℓ ← Σ_new if Σ_ℓ is unset else β Σ_ℓ + (1 − β) Σ_new
            if P_ℓ is unset or (Σ_ℓ changed and k % r == 0):
              λ ← γ tr(Σ_ℓ)/dim  (damping_mode "trace": γ tr(Σ_ℓ))
              P_ℓ ← (Σ_ℓ + λI)⁻¹, block by block when dim > B
            M_ℓ ← G_ℓ P_ℓ                      # AP; ‖M_ℓ‖ ← ‖G_ℓ‖ with grafting="grad_norm"
          if some M_ℓ is not finite: raise FloatingPointError   # nothing has changed yet
          other parameters: M = G
          if max_grad_norm: M ← M · min(1, max_grad_norm / ‖M‖_total)
          D ← GP(M)                            # Adam moments / Muon momentum + Newton–Schulz /
                                               # SGD momentum on M, exactly as on a raw gradient
          θ ← (1 − η λ_wd) θ − η D             # decoupled weight decay ("adam": torch's L2)

    ``base="signum"`` is :class:`~beyondloss.optim.bases.Signum` on every parameter;
    ``base="adamuon"`` is :class:`~beyondloss.optim.bases.AdaMuon` on the weights Muon would
    take, AdamW on the rest, as for Muon.

    ``base="muon"`` follows the usual convention: ``torch.optim.Muon`` (with
    ``adjust_lr_fn="match_rms_adamw"``, so one learning rate and weight decay serve both
    parts) on the 2-D weights of hidden ``nn.Linear`` layers, and AdamW on everything Muon
    cannot take: biases, embeddings, convolutions, norm gains, shared weights and the output
    head (the last ``nn.Linear`` registered, plus modules matching ``adamw_modules``). AP still
    applies to every supported weight before either. Muon groups also carry ``betas``, whose
    first entry is Muon's momentum (it is copied into ``momentum`` at every step), so momentum
    schedulers (OneCycleLR, CyclicLR) cycle both parts.

    With ``activation_preconditioning=False`` the optimizer is exactly its base GP; the
    baselines of a study use it so that both arms run the same code and differ only by AP.

    Parameters
    ----------
    model:
        The model (not its parameters: AP reads each layer's inputs through forward hooks).
    params:
        Optional parameters or parameter groups, as torch optimizers take them (default: all
        of ``model.parameters()``). Groups may set their own ``lr``, ``weight_decay``, ... .
    base:
        ``"adamw"``, ``"adam"``, ``"sgd"`` (momentum 0.9 unless given), ``"muon"``,
        ``"signum"``, ``"adamuon"``, or an
        ``Optimizer`` class, constructed as ``base(groups, lr=lr, weight_decay=weight_decay,
        **base_kwargs)`` (``weight_decay`` is left out for classes without it, if it is 0).
    lr, weight_decay:
        η and λ_wd; decoupled for adamw, sgd and muon (``"adam"`` keeps torch's L2 coupling).
    config:
        The AP settings (:class:`~beyondloss.optim.config.APConfig`). Its fields may instead be
        keyword arguments (``damping=1e-2, max_block_size=1024``); the remaining keyword
        arguments go to the base optimizer (``betas``, ``momentum``, ...).
    max_grad_norm:
        Clip of the *preconditioned* gradient (what the base optimizer receives) to this total
        2-norm; ``clip_grad_norm_`` before ``step()`` clips the raw gradient instead.
    activation_preconditioning:
        ``False`` gives the base optimizer alone (same code path, no hooks).
    exclude:
        ``fnmatch`` patterns of module names whose layers skip AP.
    adamw_modules:
        For ``base="muon"``: module-name patterns whose weights go to AdamW instead of Muon.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        *,
        base: str | type[Optimizer] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        config: APConfig | None = None,
        max_grad_norm: float | None = None,
        activation_preconditioning: bool = True,
        exclude: str | Sequence[str] = (),
        adamw_modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "DoPr needs the model itself (it reads layer inputs through hooks), "
                f"got {type(model).__name__}; use DoPr(model) or DoPr(model, params)"
            )
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (need > 0 or None)")
        valid_class = isinstance(base, type) and issubclass(base, Optimizer)
        if not (base in BASES if isinstance(base, str) else valid_class):
            raise ValueError(
                f"Invalid base {base!r}; expected one of {BASES} or an Optimizer class"
            )
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in APConfig.field_names()}
        if config is not None and settings:
            raise TypeError(f"give either config or AP settings {sorted(settings)}, not both")
        config = config if config is not None else APConfig.from_mapping(settings)
        groups = _groups(model, params)

        self.model = model
        self.base = base if isinstance(base, str) else base.__name__
        self.config = config
        self.max_grad_norm = max_grad_norm
        self.adamw_modules = tuple(adamw_modules)
        self._base_class = base
        self._base_kwargs = kwargs
        self.base_optimizers = self._build_base(groups, lr, weight_decay)
        optimized = [p for opt in self.base_optimizers for g in opt.param_groups
                     for p in g["params"]]
        self.preconditioner = (
            ActivationPreconditioner(model, config, exclude=exclude, params=optimized)
            if activation_preconditioning
            else None
        )
        defaults: dict[str, Any] = {}
        for opt in reversed(self.base_optimizers):
            defaults.update(opt.defaults)
        super().__init__(optimized, {**defaults, "lr": lr, "weight_decay": weight_decay})
        self._share_groups()

    # -- construction of the base optimizers ------------------------------------------------

    def _build_base(
        self, groups: list[dict[str, Any]], lr: float, weight_decay: float
    ) -> list[Optimizer]:
        base, kwargs = self._base_class, dict(self._base_kwargs)
        if not isinstance(base, str):
            accepts_decay = "weight_decay" in inspect.signature(base).parameters
            if not accepts_decay and weight_decay != 0.0:
                raise ValueError(
                    f"{base.__name__} takes no weight_decay argument; use weight_decay=0"
                )
            if accepts_decay:
                kwargs["weight_decay"] = weight_decay
            return [base(groups, lr=lr, **kwargs)]
        if base in ("adamw", "adam"):
            cls = torch.optim.AdamW if base == "adamw" else torch.optim.Adam
            return [cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)]
        if base == "sgd":
            kwargs = {"momentum": 0.9, **kwargs}
            groups = [self._sgd_group(g, weight_decay) for g in groups]
            return [torch.optim.SGD(groups, lr=lr, weight_decay=0.0, **kwargs)]
        if base == "signum":
            return [Signum(groups, lr=lr, weight_decay=weight_decay, **kwargs)]
        muon_groups, adamw_groups = self._split_for_muon(groups)
        optimizers: list[Optimizer] = []
        if muon_groups:
            if base == "muon":
                kwargs = {"adjust_lr_fn": "match_rms_adamw", **kwargs}
            matrix = MATRIX_BASES[base](muon_groups, lr=lr, weight_decay=weight_decay, **kwargs)
            optimizers.append(matrix)
        if adamw_groups:
            optimizers.append(torch.optim.AdamW(adamw_groups, lr=lr, weight_decay=weight_decay))
        self._mirror_muon_betas(optimizers)
        return optimizers

    @staticmethod
    def _sgd_group(group: dict[str, Any], weight_decay: float) -> dict[str, Any]:
        """An SGD group whose weight decay is DoPr's decoupled one (torch's SGD couples it)."""
        group = dict(group)
        group[SGD_DECAY_KEY] = group.pop("weight_decay", weight_decay)
        return group

    def _split_for_muon(
        self, groups: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Each group split into its Muon part and its AdamW part (empty parts dropped)."""
        for group in groups:
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in group["params"]):
                raise ValueError(
                    f"base={self.base!r} needs the parameter shapes: run one forward through the "
                    "lazy modules before building DoPr"
                )
        muon_ids = {id(p) for p in muon_parameter_split(self.model, self.adamw_modules)[0]}
        muon_groups, adamw_groups = [], []
        for group in groups:
            for takes_muon, target in ((True, muon_groups), (False, adamw_groups)):
                part = [p for p in group["params"] if (id(p) in muon_ids) == takes_muon]
                if part:
                    target.append({**group, "params": part})
        return muon_groups, adamw_groups

    @staticmethod
    def _mirror_muon_betas(optimizers: list[Optimizer]) -> None:
        for opt in optimizers:
            if isinstance(opt, torch.optim.Muon):
                for group in opt.param_groups:
                    group.setdefault("betas", (group["momentum"], 0.999))

    def _share_groups(self) -> None:
        """Expose the base optimizers' group dicts as ours, so LR schedulers reach them."""
        self.param_groups = [g for opt in self.base_optimizers for g in opt.param_groups]
        self.state = _RoutedState(self.base_optimizers)
        self._groups_shared = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (e.g. a new head) to the base optimizer(s); AP covers its layers too."""
        if not getattr(self, "_groups_shared", False):
            super().add_param_group(param_group)  # during Optimizer.__init__ only
            return
        (group,) = _groups(self.model, [param_group])
        if self._base_class in MATRIX_BASES:
            muon_groups, adamw_groups = self._split_for_muon([group])
            matrix = MATRIX_BASES[self._base_class]
            by_kind = {matrix: muon_groups, torch.optim.AdamW: adamw_groups}
            for kind, parts in by_kind.items():
                if not parts:
                    continue
                owners = [opt for opt in self.base_optimizers if type(opt) is kind]
                if not owners:
                    raise ValueError(
                        f"this DoPr(base='muon') has no {kind.__name__} part to take "
                        f"{sum(len(p['params']) for p in parts)} new parameters; rebuild it"
                    )
                for part in parts:
                    owners[0].add_param_group(part)
            self._mirror_muon_betas(self.base_optimizers)
        elif self._base_class == "sgd":
            self.base_optimizers[0].add_param_group(
                self._sgd_group(group, self.defaults["weight_decay"])
            )
        else:
            self.base_optimizers[0].add_param_group(group)
        self._share_groups()
        if self.preconditioner is not None:
            self.preconditioner.add_params(group["params"])

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Precondition the gradients by activations, then take one base-optimizer step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.preconditioner is not None:
            self.preconditioner.precondition()
        if self.max_grad_norm is not None:
            grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        for opt in self.base_optimizers:
            if isinstance(opt, torch.optim.Muon):
                for group in opt.param_groups:
                    group["momentum"] = group["betas"][0]
        for group in self.param_groups:
            decay = group.get(SGD_DECAY_KEY, 0.0)
            if decay:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - group["lr"] * decay)
        for opt in self.base_optimizers:
            opt.step()
        return loss

    # -- description --------------------------------------------------------------------------

    def parameter_fates(self) -> list[ParameterFate]:
        """Every model parameter (and any other optimized one) with its base optimizer and AP."""
        owner = {p: type(opt).__name__ for opt in self.base_optimizers
                 for g in opt.param_groups for p in g["params"]}
        ap = self.preconditioner
        fates, seen = [], set()
        for name, p in self.model.named_parameters():
            seen.add(p)
            if ap is None:
                status = "off"
            else:
                status = ap.parameter_status(name)
            shape = None if isinstance(p, nn.parameter.UninitializedParameter) else tuple(p.shape)
            fates.append(ParameterFate(name, shape, p.requires_grad, owner.get(p, "-"), status))
        extra = [p for p in owner if p not in seen]
        for i, p in enumerate(extra):
            fates.append(ParameterFate(f"(not in the model #{i})", tuple(p.shape),
                                       p.requires_grad, owner[p], "not preconditioned: not in "
                                       "the model, so its layer inputs are unknown"))
        return fates

    def describe(self) -> str:
        """A table: each parameter, its base optimizer and whether AP applies to it (and why)."""
        fates = self.parameter_fates()
        header = f"DoPr(base={self.base}, {self.config})"
        width = max([len("parameter"), *(len(f.name) for f in fates)])
        lines = [header, f"{'parameter':<{width}}  {'shape':<14} {'base':<6} preconditioning"]
        for f in fates:
            shape = "lazy" if f.shape is None else "x".join(map(str, f.shape)) or "scalar"
            frozen = "" if f.trainable else " [frozen]"
            lines.append(f"{f.name:<{width}}  {shape:<14} {f.base:<6} {f.preconditioning}{frozen}")
        if self.preconditioner is not None:
            lines.append(self.preconditioner.helpers_line())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's ``{"state", "param_groups"}`` over all base optimizers, plus ``"dopr"``.

        ``"dopr"`` holds the activation preconditioner (Σ, factors, counters) and how many
        groups each base optimizer has; generic tooling that only knows the two standard keys
        sees a torch-standard optimizer state.
        """
        state_dict = super().state_dict()
        state_dict["dopr"] = {
            "groups_per_base": [len(opt.param_groups) for opt in self.base_optimizers],
            "preconditioner": None
            if self.preconditioner is None
            else self.preconditioner.state_dict(),
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (a plain single-base torch state also loads)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        extra = state_dict.get("dopr", {})
        counts = extra.get("groups_per_base", [len(state_dict["param_groups"])])
        if counts != [len(opt.param_groups) for opt in self.base_optimizers]:
            raise ValueError(
                f"saved state has param groups {counts} per base optimizer, this DoPr has "
                f"{[len(opt.param_groups) for opt in self.base_optimizers]}"
            )
        saved_ap = extra.get("preconditioner")
        if "dopr" not in state_dict and self.preconditioner is not None:
            warnings.warn(
                "this state dict has no 'dopr' entry (torch.distributed.checkpoint keeps only "
                "'state' and 'param_groups'), so it holds no activation-preconditioner state: "
                "the base optimizers' state is loaded and the preconditioner keeps its own; "
                "restore it with opt.preconditioner.load_state_dict(saved['dopr']"
                "['preconditioner']) from a saved opt.state_dict()",
                stacklevel=2,
            )
        elif (saved_ap is None) != (self.preconditioner is None):
            raise ValueError(
                "saved state and this optimizer disagree on activation_preconditioning"
            )
        offset = 0
        for opt, count in zip(self.base_optimizers, counts, strict=True):
            groups = state_dict["param_groups"][offset : offset + count]
            offset += count
            indices = [i for g in groups for i in g["params"]]
            local = {old: new for new, old in enumerate(indices)}
            opt.load_state_dict(
                {
                    "state": {local[i]: s for i, s in state_dict["state"].items() if i in local},
                    "param_groups": [
                        {**g, "params": [local[i] for i in g["params"]]} for g in groups
                    ],
                }
            )
        if self.preconditioner is not None and saved_ap is not None:
            self.preconditioner.load_state_dict(saved_ap)
        self._share_groups()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but what torch's own ``Optimizer.__getstate__`` also leaves out.

        DoPr keeps its model, preconditioner and base optimizers (a copy must record its own
        model's inputs), but not the per-instance ``step`` wrapper an LR scheduler installs nor
        the registered optimizer hooks: both are closures over *this* optimizer, so a copy that
        kept them would not pickle, or would step the original. ``__setstate__`` recreates
        empty hook tables, and a scheduler built on the copy wraps its ``step`` again.
        """
        dropped = {"step", *(name for name in self.__dict__ if name.startswith("_optimizer_"))}
        return {name: value for name, value in self.__dict__.items() if name not in dropped}
