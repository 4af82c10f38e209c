"""The activation preconditioner (AP): M = G (Σ + λI)⁻¹ for every supported layer.

For a layer with weight gradient G (d_out × dim) and input rows z̃ = [z; 1] (the 1 only when
the layer has a trained bias), the AP replaces G by

    Σ = (1/n) Σ_i z̃_i z̃_iᵀ            uncentered second moment of this step's inputs
    Σ ← β Σ_prev + (1 − β) Σ           optional EMA across collection steps (β = ``ema_decay``)
    M = G (Σ + λ I)⁻¹                   λ from ``damping`` γ and tr(Σ), see :mod:`.linalg`

and leaves every other parameter's gradient untouched. Composing with any optimizer::

    ap = ActivationPreconditioner(model, damping=1e-3)
    loss.backward(); ap.precondition(); optimizer.step()

Statistics come from forward pre-hooks that record only in training mode with grad enabled, so
evaluation and rollouts under ``torch.no_grad()`` never pollute Σ. Every forward between two
``precondition()`` calls is pooled (gradient accumulation, rollouts with grad, layers called
several times). Amortization: hooks record only on steps ``k`` with ``k % cov_every == 0`` (on
other steps they return at once) and the inverse is refreshed at most every ``inverse_every``
steps; between refreshes the last P is reused. Under ``torch.distributed`` with world size > 1,
the pooled sums (Σ_i z̃_i z̃_iᵀ, n) are all-reduced before Σ is formed, so every rank applies
the same P — the one the concatenated global batch would give.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from beyondloss.optim.layers import LayerHelper, UnsupportedLayer, helper_for
from beyondloss.optim.linalg import DAMPING_MODES, Inverse, damped_inverse

DEFAULT_DAMPING = 1e-3
DEFAULT_COV_EVERY = 10
DEFAULT_INVERSE_EVERY = 10
DEFAULT_EMA_DECAY = 0.9
"""Default amortization: statistics recorded on every 10th step, P refreshed with them, Σ an
EMA (0.9) over collections, i.e. over about 100 steps. A step then costs close to the FLOP floor
of its base optimizer (docs/benchmark.md); on Lorenz-63 its rollouts were as good as the
per-batch formula's (``cov_every=inverse_every=1, ema_decay=0``) for AdamW and better for Muon
(docs/lorenz.md)."""


@dataclass
class _LayerState:
    """Statistics and factor of one preconditioned layer."""

    helper: LayerHelper
    second: Tensor | None = None  # pooled Σ_i z_i z_iᵀ (or counts) since the last step
    first: Tensor | None = None  # pooled Σ_i z_i
    n: int = 0
    sigma: Tensor | None = None  # current (EMA of) Σ
    inverse: Inverse | None = None
    stale: bool = False  # Σ changed since `inverse` was computed

    def zero_moments(self) -> tuple[Tensor, Tensor | None]:
        weight = self.helper.module.weight
        like = {"device": weight.device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
        d = self.helper.in_features
        if self.helper.diagonal:
            return torch.zeros(d, **like), None
        return torch.zeros(d, d, **like), torch.zeros(d, **like)


def _check_positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ActivationPreconditioner:
    """Activation preconditioning of a model's Linear, Conv1d/2d and Embedding layers.

    Parameters
    ----------
    model:
        The module whose layers are preconditioned; hooks are registered on construction.
    damping:
        γ ≥ 0, the relative ridge (see :mod:`beyondloss.optim.linalg`).
    damping_mode:
        ``"trace_over_dim"`` (λ = γ·tr(Σ)/d, default) or ``"trace"`` (λ = γ·tr(Σ)).
    ema_decay:
        β ∈ [0, 1); 0 uses each collection step's Σ alone.
    cov_every, inverse_every:
        Record statistics every ``cov_every`` steps; refresh P at most every ``inverse_every``.
        The defaults amortize (see ``DEFAULT_COV_EVERY``); 1, 1 and ``ema_decay=0`` give the
        per-batch formula, Σ and P from the very batch being stepped on.
    exclude:
        ``fnmatch`` patterns of module names left to the gradient preconditioner untouched.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = DEFAULT_DAMPING,
        damping_mode: str = "trace_over_dim",
        ema_decay: float = DEFAULT_EMA_DECAY,
        cov_every: int = DEFAULT_COV_EVERY,
        inverse_every: int = DEFAULT_INVERSE_EVERY,
        exclude: Sequence[str] = (),
    ) -> None:
        if not damping >= 0.0:
            raise ValueError(f"Invalid damping value: {damping}")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"Invalid damping_mode {damping_mode!r}; expected one of {DAMPING_MODES}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"Invalid ema_decay value: {ema_decay} (need 0 <= ema_decay < 1)")
        _check_positive_int(cov_every, "cov_every")
        _check_positive_int(inverse_every, "inverse_every")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.damping = damping
        self.damping_mode = damping_mode
        self.ema_decay = ema_decay
        self.cov_every = cov_every
        self.inverse_every = inverse_every
        self.exclude = tuple(exclude)
        self.steps = 0
        self.layers: dict[str, _LayerState] = {}
        self.excluded: dict[str, str] = {}
        self._handles = []
        self._register(model)

    def _register(self, model: nn.Module) -> None:
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        bypassing = {
            name
            for parent_name, parent in model.named_modules()
            if isinstance(parent, nn.MultiheadAttention)
            for name, _ in parent.named_modules(prefix=parent_name)
        }
        for name, module in model.named_modules():
            try:
                helper = helper_for(module)
            except UnsupportedLayer as reason:
                self.excluded[name] = str(reason)
                continue
            if helper is None:
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
                self.excluded[name] = "excluded by name pattern"
            elif name in bypassing:
                self.excluded[name] = "inside nn.MultiheadAttention, whose forward bypasses hooks"
            elif any(uses[id(p)] > 1 for p in helper.params):
                self.excluded[name] = "shares a parameter with another module"
            else:
                state = _LayerState(helper)
                self.layers[name] = state
                hook = self._make_hook(state)
                self._handles.append(module.register_forward_pre_hook(hook))

    def _make_hook(self, state: _LayerState):
        def record(module: nn.Module, args: tuple) -> None:
            if not (self.collecting and module.training and torch.is_grad_enabled()):
                return
            second, first, n = state.helper.moments(args[0])
            if state.second is None:
                state.second, state.first = second, first
            else:
                state.second += second
                if first is not None:
                    state.first += first
            state.n += n

        return record

    @property
    def collecting(self) -> bool:
        """Whether forwards of the current step record statistics."""
        return self.steps % self.cov_every == 0

    def remove(self) -> None:
        """Remove the forward hooks (the preconditioner stops recording)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _consume_statistics(self) -> None:
        """Turn the pooled statistics of this step into Σ (all-reduced across ranks)."""
        states = list(self.layers.values())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for s in states:
                if s.second is None:
                    s.second, s.first = s.zero_moments()
            parts = [s.second.reshape(-1) for s in states]
            parts += [s.first for s in states if s.first is not None]
            parts.append(torch.tensor([float(s.n) for s in states], device=parts[0].device))
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            offset = 0
            for s in states:
                s.second = flat[offset : offset + s.second.numel()].view_as(s.second)
                offset += s.second.numel()
            for s in states:
                if s.first is not None:
                    s.first = flat[offset : offset + s.first.numel()]
                    offset += s.first.numel()
            for s, n in zip(states, flat[offset:].tolist(), strict=True):
                s.n = round(n)
        for s in states:
            if s.n > 0:
                sigma = s.helper.covariance(s.second, s.first, s.n)
                if s.sigma is None or self.ema_decay == 0.0:
                    s.sigma = sigma
                else:
                    s.sigma.mul_(self.ema_decay).add_(sigma, alpha=1.0 - self.ema_decay)
                s.stale = True
            s.second, s.first, s.n = None, None, 0

    @torch.no_grad()
    def precondition(self) -> None:
        """Replace each supported layer's gradient G by M = G (Σ + λI)⁻¹; advance one step."""
        if self.collecting:
            self._consume_statistics()
        refresh = self.steps % self.inverse_every == 0
        for name in list(self.layers):
            state = self.layers[name]
            grad = state.helper.grad_matrix()
            if grad is None:
                continue
            if state.sigma is None:
                del self.layers[name]
                self.excluded[name] = "has a gradient but its forward bypassed the hooks"
                warnings.warn(
                    f"layer {name!r} received a gradient without recorded inputs; "
                    "it is left to the gradient preconditioner",
                    stacklevel=2,
                )
                continue
            if state.inverse is None or (state.stale and refresh):
                state.inverse = damped_inverse(state.sigma, self.damping, self.damping_mode, name)
                state.stale = False
            state.helper.set_grad_matrix(state.inverse.apply(grad))
        self.steps += 1

    def describe(self) -> str:
        """A table of which layers are preconditioned (and Σ's side) and which are not, and why."""
        lines = [f"{'layer':<40} {'kind':<12} status"]
        for name, state in self.layers.items():
            kind = type(state.helper.module).__name__
            form = "diagonal" if state.helper.diagonal else f"{state.helper.dim}x{state.helper.dim}"
            lines.append(f"{name:<40} {kind:<12} preconditioned (Σ {form})")
        for name, reason in self.excluded.items():
            lines.append(f"{name:<40} {'':<12} not preconditioned: {reason}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """Σ, factors, pending statistics and counters; tensors and plain values only."""
        layers = {}
        for name, s in self.layers.items():
            layers[name] = {
                "second": s.second,
                "first": s.first,
                "n": s.n,
                "sigma": s.sigma,
                "inverse": None if s.inverse is None else s.inverse.matrix,
                "inverse_damping": None if s.inverse is None else s.inverse.damping,
                "inverse_method": None if s.inverse is None else s.inverse.method,
                "stale": s.stale,
            }
        return {"steps": self.steps, "layers": layers, "excluded": dict(self.excluded)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the model must have the same layers."""
        for name in set(self.layers) - set(state_dict["layers"]):
            if name in state_dict["excluded"]:
                del self.layers[name]
        if set(self.layers) != set(state_dict["layers"]):
            raise ValueError(
                "preconditioned layers differ from the saved state: "
                f"{sorted(set(self.layers) ^ set(state_dict['layers']))}"
            )
        self.steps = int(state_dict["steps"])
        self.excluded = dict(state_dict["excluded"])

        def own(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        for name, saved in state_dict["layers"].items():
            s = self.layers[name]
            s.second, s.first, s.n = own(saved["second"]), own(saved["first"]), int(saved["n"])
            s.sigma, s.stale = own(saved["sigma"]), bool(saved["stale"])
            s.inverse = None
            if saved["inverse"] is not None:
                s.inverse = Inverse(
                    own(saved["inverse"]), float(saved["inverse_damping"]), saved["inverse_method"]
                )
