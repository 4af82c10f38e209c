"""The activation preconditioner (AP): M = G (Σ + λI)⁻¹ for every supported layer.

For a layer with weight gradient G (d_out × dim) and input rows z̃ = [z; 1] (the 1 only when
the layer has a bias), the AP replaces G by

    Σ = (1/n) Σ_i z̃_i z̃_iᵀ            uncentered second moment of the recorded inputs
    Σ ← β Σ_prev + (1 − β) Σ           EMA across collection steps (β = ``ema_decay``)
    M = G (Σ + λ I)⁻¹                   λ from ``damping`` γ and tr(Σ), see :mod:`.linalg`

and leaves every other parameter's gradient untouched. Composing with any optimizer::

    ap = ActivationPreconditioner(model, config=APConfig(damping=1e-3))
    loss.backward(); ap.precondition(); optimizer.step()

What is recorded (the rule does not depend on ``module.training``):

* A forward through a supported layer with grad enabled records that layer's input statistics
  when the layer is *recording*: on collection steps (step k with k % cov_every == 0), and on
  every step while the layer has no Σ yet — so a layer first used late, or after steps taken
  before any forward, collects at its first backpropagated forward whatever the schedule.
* Recorded statistics count at the next :meth:`precondition` only for layers that received a
  gradient then (were backpropagated); :meth:`discard_pending` drops what was recorded since
  the last step. Forwards under ``torch.no_grad()`` or ``torch.inference_mode()`` —
  evaluation, rollouts — are never recorded; a forward with grad enabled that is not
  backpropagated, in a step where the layer is backpropagated, is pooled with the others.
* Every counted forward between two steps is pooled (gradient accumulation, layers called
  several times). Σ is refreshed on steps that counted statistics, P at most every
  ``inverse_every`` steps and whenever a layer has none; in between the last P is reused.
* Under ``torch.distributed`` with world size > 1 the pooled sums (Σ_i z̃_i z̃_iᵀ, n) are
  all-reduced before Σ is formed, so every rank applies the P of the global batch.

Hooks follow the module, not copies of it: ``copy.deepcopy(model)`` (an EMA or teacher copy)
and pickling give modules whose hooks are inert, and a preconditioner that is garbage-collected
removes its hooks. A new preconditioner on a layer that another one preconditions takes the
layer over; the older one then raises at its next step instead of silently using a stale Σ.
"""

from __future__ import annotations

import fnmatch
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from beyondloss.optim.compile_guards import guard_module_hooks
from beyondloss.optim.config import APConfig
from beyondloss.optim.diagnostics import LayerSpectrum, layer_spectrum
from beyondloss.optim.layers import (
    HELPERS,
    NAMED_HELPERS,
    Bounds,
    LayerHelper,
    UnsupportedLayer,
    helper_for,
)
from beyondloss.optim.linalg import Inverse, block_bounds, damped_inverse

NOT_OPTIMIZED = "its parameters are not all held by the optimizer"


@dataclass(eq=False)
class _LayerState:
    """Statistics and factor of one preconditioned layer."""

    name: str
    helper: LayerHelper
    max_block_size: int | None
    recording: bool = True  # whether forwards with grad enabled record statistics now
    bounds: Bounds | None = None  # blocks of Σ over the dim coordinates (known at first use)
    second: list[Tensor] | None = None  # pooled Z_bᵀZ_b blocks (or counts) since the last step
    first: Tensor | None = None  # pooled Σ_i z_i
    n: int = 0
    sigma: list[Tensor] | None = None  # current (EMA of) Σ, as blocks
    inverse: Inverse | None = None
    inverse_with_bias: bool = True  # whether `inverse` includes the bias coordinate
    stale: bool = False  # Σ changed since `inverse` was computed
    taken_over: bool = False  # another preconditioner now records this layer
    warned: bool = False

    def columns(self) -> Bounds:
        """The weight-column blocks of Σ; the block bounds are fixed at first use (a lazy
        layer knows its width only after its first forward)."""
        if self.bounds is None:
            self.bounds = block_bounds(self.helper.dim, self.max_block_size)
        return self.helper.columns(self.bounds)

    def record(self, x: Tensor) -> None:
        second, first, n = self.helper.moments(x, self.columns())
        if self.second is None:
            self.second, self.first = second, first
        else:
            self.second = [total + part for total, part in zip(self.second, second, strict=True)]
            if first is not None:
                self.first = self.first + first
        self.n += n

    def zero_moments(self) -> tuple[list[Tensor], Tensor | None]:
        weight = self.helper.module.weight
        like = {"device": weight.device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
        columns = self.columns()
        if self.helper.diagonal:
            return [torch.zeros(self.helper.in_features, **like)], None
        blocks = [torch.zeros(stop - start, stop - start, **like) for start, stop in columns]
        return blocks, torch.zeros(self.helper.in_features, **like)

    def discard(self) -> None:
        self.second, self.first, self.n = None, None, 0


class _RecordInputs:
    """The forward pre-hook of one layer: records its input into the layer's statistics.

    It holds the state weakly, so an abandoned preconditioner stops recording, and it copies
    and pickles as an inert hook, so the forwards of ``copy.deepcopy(model)`` are not recorded.
    """

    def __init__(self, state: _LayerState) -> None:
        self.state = weakref.ref(state)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state()
        if state is None or not state.recording or not torch.is_grad_enabled():
            return None
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        state.record(x)
        return None

    def owned_by_live_preconditioner(self) -> bool:
        state = self.state()
        return state is not None and not state.taken_over

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class _InertHook:
    """What a copied or unpickled :class:`_RecordInputs` becomes: a hook that does nothing."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        return None


def _graft_scale(full_grad: Tensor, grad: Tensor, m: Tensor) -> Tensor:
    """‖G‖ / ‖M‖ of the whole layer; under FSDP2 the squares of the local rows are summed."""
    squares = torch.stack([grad.square().sum(), m.square().sum()])
    placements = getattr(full_grad, "placements", ())
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            dist.all_reduce(squares, group=full_grad.device_mesh.get_group(mesh_dim))
    g_norm, m_norm = squares.sqrt()
    return g_norm / m_norm.clamp_min(torch.finfo(m.dtype).tiny)


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class ActivationPreconditioner:
    """Activation preconditioning of a model's Linear, Conv1d/2d and Embedding layers.

    Parameters
    ----------
    model:
        The module whose layers are preconditioned; hooks are registered on construction.
    config:
        The settings (:class:`~beyondloss.optim.config.APConfig`); its fields may instead be
        given as keyword arguments, e.g. ``ActivationPreconditioner(model, damping=1e-2)``.
    exclude:
        ``fnmatch`` patterns of module names left to the gradient preconditioner untouched.
    params:
        The parameters the optimizer steps (default: all); a layer is preconditioned only if
        its weight and bias are among them.
    """

    def __init__(
        self,
        model: nn.Module,
        config: APConfig | None = None,
        *,
        exclude: str | Sequence[str] = (),
        params: Iterable[Tensor] | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "ActivationPreconditioner needs the model (it reads layer inputs through "
                f"hooks), got {type(model).__name__}"
            )
        if config is not None and settings:
            raise TypeError(f"give either config or settings {sorted(settings)}, not both")
        self.config = config if config is not None else APConfig.from_mapping(settings)
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.model = model
        self.steps = 0
        self.layers: dict[str, _LayerState] = {}
        self.excluded: dict[str, str] = {}
        self._optimized = None if params is None else {id(p) for p in params}
        self._handles: list = []
        self._finalizer = weakref.finalize(self, _remove_hooks, self._handles)
        self._register()

    # -- registration -------------------------------------------------------------------

    def _register(self) -> None:
        """Find the supported layers not yet registered, and hook them."""
        model = self.model
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        bypassing = {
            name
            for parent_name, parent in model.named_modules()
            if isinstance(parent, nn.MultiheadAttention)
            for name, _ in parent.named_modules(prefix=parent_name)
            if name != parent_name
        }
        new = []
        ends = self._out_of_scope()
        for name, module in model.named_modules():
            if name in self.layers or name in self.excluded:
                continue
            try:
                helper = helper_for(module)
            except UnsupportedLayer as reason:
                self.excluded[name] = str(reason)
                continue
            if helper is None:
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
                self.excluded[name] = "excluded by name pattern"
            elif name in ends:
                self.excluded[name] = ends[name]
            elif name in bypassing:
                self.excluded[name] = "inside nn.MultiheadAttention, whose forward bypasses hooks"
            elif any(uses[id(p)] > 1 for p in helper.params):
                self.excluded[name] = "shares a parameter with another module"
            elif self._optimized is not None and any(
                id(p) not in self._optimized for p in helper.params
            ):
                self.excluded[name] = NOT_OPTIMIZED
            else:
                self.layers[name] = _LayerState(name, helper, self.config.max_block_size)
                new.append(self.layers[name])
        self._attach_hooks(new)

    def _out_of_scope(self) -> dict[str, str]:
        """``{name: reason}`` of the supported layers that ``config.scope`` leaves out: the
        first (input layer) and/or the last (output head) in module order."""
        scope = self.config.scope
        if scope == "all":
            return {}
        supported = []
        for name, module in self.model.named_modules():
            try:
                if helper_for(module) is not None:
                    supported.append(name)
            except UnsupportedLayer:
                continue
        out: dict[str, str] = {}
        if supported and scope in ("hidden", "no_input"):
            out[supported[0]] = f"the input layer, out of scope {scope!r}"
        if supported and scope in ("hidden", "no_head"):
            out[supported[-1]] = f"the output head, out of scope {scope!r}"
        return out

    def add_params(self, params: Iterable[Tensor]) -> None:
        """Precondition also the layers of ``params`` (new parameter groups of the optimizer)."""
        if self._optimized is None:
            return
        self._optimized |= {id(p) for p in params}
        for name in [n for n, why in self.excluded.items() if why == NOT_OPTIMIZED]:
            del self.excluded[name]
        self._register()

    def _attach_hooks(self, states: Iterable[_LayerState]) -> None:
        guard_module_hooks()
        for state in states:
            hooks = state.helper.module._forward_pre_hooks
            for key, hook in list(hooks.items()):
                if isinstance(hook, _RecordInputs) and hook.owned_by_live_preconditioner():
                    hook.state().taken_over = True
                    del hooks[key]
            handle = state.helper.module.register_forward_pre_hook(
                _RecordInputs(state), with_kwargs=True
            )
            self._handles.append(handle)

    def remove(self) -> None:
        """Remove the forward hooks (the preconditioner stops recording)."""
        _remove_hooks(self._handles)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_handles"], state["_finalizer"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles = []
        self._finalizer = weakref.finalize(self, _remove_hooks, self._handles)
        self._attach_hooks(self.layers.values())

    # -- the step -----------------------------------------------------------------------

    @property
    def collecting(self) -> bool:
        """Whether the current step is a collection step of the schedule."""
        return self.steps % self.config.cov_every == 0

    def discard_pending(self) -> None:
        """Drop the statistics recorded since the last step (forwards not to count)."""
        for state in self.layers.values():
            state.discard()

    def _all_reduce(self, states: list[_LayerState]) -> None:
        """Sum the pending statistics of ``states`` over ranks (zeros where a rank has none)."""
        for s in states:
            if s.second is None:
                s.second, s.first = s.zero_moments()
        parts = [block.reshape(-1) for s in states for block in s.second]
        parts += [s.first for s in states if s.first is not None]
        parts.append(torch.tensor([float(s.n) for s in states], device=parts[0].device))
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        offset = 0
        for s in states:
            blocks = []
            for block in s.second:
                blocks.append(flat[offset : offset + block.numel()].view_as(block))
                offset += block.numel()
            s.second = blocks
        for s in states:
            if s.first is not None:
                s.first = flat[offset : offset + s.first.numel()]
                offset += s.first.numel()
        for s, n in zip(states, flat[offset:].tolist(), strict=True):
            s.n = round(n)

    def _consume_statistics(self, backpropagated: set[int]) -> None:
        """Fold the pending statistics of backpropagated layers into Σ; drop the rest."""
        for state in self.layers.values():
            if id(state) not in backpropagated:
                state.discard()
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        must_reduce = self.collecting or any(s.sigma is None for s in self.layers.values())
        if distributed and must_reduce:
            self._all_reduce(list(self.layers.values()))
        beta = self.config.ema_decay
        for s in self.layers.values():
            if s.n > 0:
                sigma = s.helper.covariance(s.second, s.first, s.n, s.bounds)
                if s.sigma is None or beta == 0.0:
                    s.sigma = sigma
                else:
                    for total, batch in zip(s.sigma, sigma, strict=True):
                        total.mul_(beta).add_(batch, alpha=1.0 - beta)
                s.stale = True
            s.discard()

    @torch.no_grad()
    def precondition(self) -> None:
        """Replace each supported layer's gradient G by M = G (Σ + λI)⁻¹; advance one step.

        Raises ``FloatingPointError`` naming the layers whose M is not finite (NaN or inf in
        their inputs or gradients) before any gradient is written, and ``RuntimeError`` if
        another preconditioner has taken over one of the layers.
        """
        taken = [name for name, s in self.layers.items() if s.taken_over]
        if taken:
            raise RuntimeError(
                f"layers {taken} are now preconditioned by a newer ActivationPreconditioner "
                "(or DoPr) built on the same model; step that one, or build this one last"
            )
        backpropagated = [
            s for s in self.layers.values() if s.helper.module.weight.grad is not None
        ]
        self._consume_statistics({id(s) for s in backpropagated})
        refresh = self.steps % self.config.inverse_every == 0
        updates = []
        for state in backpropagated:
            if state.sigma is None:
                self._warn_unrecorded(state)
                continue
            with_bias = state.helper.trains_bias()
            grad = state.helper.grad_matrix(with_bias)
            if (
                state.inverse is None
                or (state.stale and refresh)
                or state.inverse_with_bias != with_bias
            ):
                blocks = state.sigma if with_bias else state.helper.without_bias(state.sigma)
                state.inverse = damped_inverse(
                    blocks, self.config.damping, self.config.damping_mode, state.name
                )
                state.inverse_with_bias, state.stale = with_bias, False
            m = state.inverse.apply(grad)
            if self.config.grafting == "grad_norm":
                m = m * _graft_scale(state.helper.module.weight.grad, grad, m)
            updates.append((state, m, with_bias))
        self._check_finite(updates)
        for state, m, with_bias in updates:
            state.helper.set_grad_matrix(m, with_bias)
        self.steps += 1
        collecting = self.collecting
        for state in self.layers.values():
            state.recording = collecting or state.sigma is None

    @staticmethod
    def _check_finite(updates: list[tuple[_LayerState, Tensor, bool]]) -> None:
        """Raise if some M holds a NaN or inf, with one host sync per step.

        The sum of M is NaN or inf whenever an entry is (it also flags a sum that overflows,
        i.e. entries near the dtype's maximum); one reduction per layer is ~8× cheaper here
        than ``isfinite(M).all()``.
        """
        if not updates:
            return
        finite = torch.isfinite(torch.stack([m.sum() for _, m, _ in updates]))
        if bool(finite.all()):
            return
        flags = zip(updates, finite.tolist(), strict=True)
        bad = [state.name for (state, _, _), ok in flags if not ok]
        raise FloatingPointError(
            f"preconditioned gradient of layers {bad} is not finite (NaN or inf in their "
            "inputs or gradients); no gradient was changed"
        )

    def _warn_unrecorded(self, state: _LayerState) -> None:
        if not state.warned:
            warnings.warn(
                f"layer {state.name!r} received a gradient without recorded inputs (its forward "
                "ran outside the module call, e.g. F.linear on its weight); its gradient goes "
                "to the base optimizer unpreconditioned until a forward is recorded",
                stacklevel=3,
            )
            state.warned = True

    # -- description --------------------------------------------------------------------

    def spectra(self) -> dict[str, LayerSpectrum]:
        """The spectrum summary of each layer's current Σ (layers without Σ are left out)."""
        return {
            name: layer_spectrum(state.sigma, self.config.damping, self.config.damping_mode)
            for name, state in self.layers.items()
            if state.sigma is not None
        }

    def spectrum_metrics(self) -> dict[str, float]:
        """:meth:`spectra` flattened for a results store: ``ap/<layer>/<field>`` → value."""
        metrics: dict[str, float] = {}
        for name, spectrum in self.spectra().items():
            metrics |= spectrum.as_metrics(f"ap/{name or '(root)'}/")
        return metrics

    def layer_status(self, name: str) -> str:
        """How layer ``name`` is treated, in words (for :meth:`describe` and ``DoPr``)."""
        if name in self.excluded:
            return f"not preconditioned: {self.excluded[name]}"
        state = self.layers[name]
        helper = state.helper
        if isinstance(helper.module.weight, nn.parameter.UninitializedParameter):
            return "preconditioned (lazy: Σ's side is known after the first forward)"
        if helper.diagonal:
            return f"preconditioned (Σ diagonal, {helper.dim})"
        bounds = state.bounds or block_bounds(helper.dim, self.config.max_block_size)
        if len(bounds) == 1:
            return f"preconditioned (Σ {helper.dim}x{helper.dim})"
        sizes = Counter(stop - start for start, stop in bounds)
        blocks = " + ".join(f"{count}x[{size}x{size}]" for size, count in sizes.items())
        return f"preconditioned (Σ block-diagonal, {blocks})"

    def parameter_status(self, parameter: str) -> str:
        """How the model parameter named ``parameter`` is treated by AP, in words."""
        owner, _, attribute = parameter.rpartition(".")
        parts = owner.split(".")
        if "parametrizations" in parts:
            owner = ".".join(parts[: parts.index("parametrizations")])
        if owner in self.layers:
            helper = self.layers[owner].helper
            if attribute == "weight":
                return self.layer_status(owner)
            if attribute == "bias" and helper.has_bias:
                return f"preconditioned with {owner or '(root)'}.weight (the bias column of Σ)"
            return "not preconditioned: not the weight or bias of its layer"
        if owner in self.excluded:
            return f"not preconditioned: {self.excluded[owner]}"
        module = self.model.get_submodule(owner)
        if isinstance(module, nn.MultiheadAttention):
            return (
                "not preconditioned: nn.MultiheadAttention uses it in a fused kernel, "
                "not through a layer whose inputs can be recorded"
            )
        return f"not preconditioned: no helper for {type(module).__name__}"

    @staticmethod
    def helpers_line() -> str:
        """Which layer kinds have helpers, and how to add one (the footer of ``describe``)."""
        known = ", ".join([cls.__name__ for cls in HELPERS] + [*NAMED_HELPERS])
        return f"layer kinds with helpers: {known}; add one with optim.layers.register_helper"

    def describe(self) -> str:
        """A table of which layers are preconditioned (and Σ's form) and which are not, and why."""
        lines = [f"{'layer':<40} {'kind':<12} status"]
        for name in [*self.layers, *self.excluded]:
            module = self.model.get_submodule(name)
            kind = type(module).__name__
            lines.append(f"{name or '(root)':<40} {kind:<12} {self.layer_status(name)}")
        return "\n".join([*lines, self.helpers_line()])

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Σ, factors, pending statistics and counters; tensors and plain values only."""
        layers = {}
        for name, s in self.layers.items():
            layers[name] = {
                "recording": s.recording,
                "bounds": None if s.bounds is None else [list(b) for b in s.bounds],
                "second": s.second,
                "first": s.first,
                "n": s.n,
                "sigma": s.sigma,
                "inverse": None if s.inverse is None else s.inverse.blocks,
                "inverse_damping": None if s.inverse is None else s.inverse.damping,
                "inverse_method": None if s.inverse is None else s.inverse.method,
                "inverse_with_bias": s.inverse_with_bias,
                "stale": s.stale,
            }
        return {"steps": self.steps, "layers": layers, "excluded": dict(self.excluded)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, on each layer's device (as torch optimizers do).

        The model must have the same preconditioned layers.
        """
        if set(self.layers) != set(state_dict["layers"]):
            raise ValueError(
                "preconditioned layers differ from the saved state: "
                f"{sorted(set(self.layers) ^ set(state_dict['layers']))}"
            )
        self.steps = int(state_dict["steps"])

        for name, saved in state_dict["layers"].items():
            s = self.layers[name]
            device = s.helper.module.weight.device

            def own(t: Any, device: torch.device = device) -> Any:
                if isinstance(t, list):
                    return [block.to(device, copy=True) for block in t]
                return None if t is None else t.to(device, copy=True)

            s.recording = bool(saved["recording"])
            s.bounds = None if saved["bounds"] is None else [tuple(b) for b in saved["bounds"]]
            s.second, s.first, s.n = own(saved["second"]), own(saved["first"]), int(saved["n"])
            s.sigma, s.stale = own(saved["sigma"]), bool(saved["stale"])
            s.inverse = None
            s.inverse_with_bias = bool(saved["inverse_with_bias"])
            if saved["inverse"] is not None:
                blocks = own(saved["inverse"])
                start, bounds = 0, []
                for block in blocks:
                    bounds.append((start, start + block.shape[0]))
                    start += block.shape[0]
                s.inverse = Inverse(
                    blocks, bounds, float(saved["inverse_damping"]), saved["inverse_method"]
                )
