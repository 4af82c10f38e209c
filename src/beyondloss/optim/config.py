"""APConfig: the one settings object of the activation preconditioner.

Every place that sets DoPr's activation-preconditioner (AP) settings — :class:`DoPr`,
:class:`~beyondloss.optim.preconditioner.ActivationPreconditioner`, the study runner and the
command line — builds an :class:`APConfig`, so each setting is declared, defaulted and
validated here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DAMPING_MODES = ("trace_over_dim", "trace")
GRAFTING_MODES = ("none", "grad_norm")
SCOPES = ("all", "hidden", "no_input", "no_head")
"""Which supported layers AP preconditions: all of them, or all but the first (the input
layer), the last (the output head) or both (``hidden``), in module order."""


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool | str) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class APConfig:
    """Settings of the activation preconditioner M = G (Σ + λI)⁻¹.

    Attributes
    ----------
    damping:
        γ ≥ 0, the relative ridge: λ = γ·tr(Σ)/d (``damping_mode="trace_over_dim"``) or
        λ = γ·tr(Σ) (``"trace"``, the DoPr paper's formula).
    damping_mode:
        One of :data:`DAMPING_MODES`.
    ema_decay:
        β ∈ [0, 1): Σ ← β Σ_prev + (1 − β) Σ_batch across collection steps; 0 keeps the last.
    cov_every:
        Record activation statistics on steps k with k % cov_every == 0 (and, whatever the
        schedule, on the first backpropagated step of a layer that has none yet).
    inverse_every:
        Refresh P = (Σ + λI)⁻¹ at most every ``inverse_every`` steps (and whenever a layer has
        none yet). ``cov_every = inverse_every = 1, ema_decay = 0`` is the per-batch formula.
    max_block_size:
        ``None`` keeps Σ dense. An integer B ≥ 1 makes Σ block-diagonal over contiguous blocks
        of at most B input coordinates (the bias coordinate belongs to the last block): memory
        and factorization cost fall from dim² and dim³ to dim·B and dim·B². Exact whenever
        B ≥ dim. λ is computed from the trace of the whole layer in either case.
    grafting:
        ``"none"`` (the paper's update) or ``"grad_norm"``: each layer's preconditioned
        gradient is rescaled to the Frobenius norm of its raw gradient, ‖M‖ = ‖G‖, so that the
        step size of a base optimizer that is not scale-invariant (SGD) carries over.
    scope:
        One of :data:`SCOPES`. The first and last supported layers in the model's module order
        (``named_modules``; for an ``nn.Sequential`` MLP, the input layer and the output head)
        are left to the gradient preconditioner by ``no_input``, ``no_head`` and ``hidden``.
    """

    damping: float = field(default=1e-3, metadata={"help": "relative ridge γ"})
    damping_mode: str = field(
        default="trace_over_dim", metadata={"help": "ridge scale", "choices": DAMPING_MODES}
    )
    ema_decay: float = field(
        default=0.9, metadata={"help": "EMA decay of Σ across collections, in [0, 1)"}
    )
    cov_every: int = field(default=10, metadata={"help": "steps between activation statistics"})
    inverse_every: int = field(default=10, metadata={"help": "steps between inverse refreshes"})
    max_block_size: int | None = field(
        default=None, metadata={"help": "largest diagonal block of a wide layer's Σ; None: dense Σ"}
    )
    grafting: str = field(
        default="none",
        metadata={
            "help": "step-length grafting of the preconditioned gradient",
            "choices": GRAFTING_MODES,
        },
    )
    scope: str = field(
        default="all",
        metadata={"help": "layers AP preconditions (first/last: module order)", "choices": SCOPES},
    )

    def __post_init__(self) -> None:
        damping = _number(self.damping, "damping")
        if not (math.isfinite(damping) and damping >= 0.0):
            raise ValueError(f"damping must be finite and >= 0, got {self.damping!r}")
        if self.damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"damping_mode must be one of {', '.join(DAMPING_MODES)}, "
                f"got {self.damping_mode!r}"
            )
        ema_decay = _number(self.ema_decay, "ema_decay")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be >= 0 and < 1, got {self.ema_decay!r}")
        _positive_int(self.cov_every, "cov_every")
        _positive_int(self.inverse_every, "inverse_every")
        if self.max_block_size is not None:
            _positive_int(self.max_block_size, "max_block_size")
        if self.grafting not in GRAFTING_MODES:
            raise ValueError(
                f"grafting must be one of {', '.join(GRAFTING_MODES)}, got {self.grafting!r}"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        object.__setattr__(self, "damping", damping)
        object.__setattr__(self, "ema_decay", ema_decay)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings' names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> APConfig:
        """An APConfig from ``{name: value}``; unknown names raise a ``ValueError``."""
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown activation-preconditioner settings {unknown}; "
                f"expected some of {', '.join(cls.field_names())}"
            )
        return cls(**settings)

    def as_dict(self) -> dict[str, Any]:
        """Every setting as ``{name: value}``."""
        return asdict(self)

    def overrides(self) -> dict[str, Any]:
        """The settings that differ from the defaults, in declaration order."""
        default = APConfig()
        return {
            name: value
            for name, value in self.as_dict().items()
            if value != getattr(default, name)
        }
