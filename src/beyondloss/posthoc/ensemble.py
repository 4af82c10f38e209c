"""Ensembles of independently trained runs and the post-hoc compositions built on them.

An ensemble combines ``M`` members' logits ``z_m`` of shape ``(N, C)`` (same inputs, e.g.
runs with different seeds at one epoch) into one ``(N, C)`` tensor of logits:

    mean of logits (default):      z = (1/M) Σ_m z_m
    mean of probabilities:         z = log( (1/M) Σ_m softmax(z_m) )

A :class:`Composition` is one post-hoc transform pipeline, applied in the order of the
post-hoc reversal paper (Ranjan et al., 2024):

    source model (base, SWA or EMA)  →  TS per member  →  ensemble  →  TS again

Every temperature is fitted by NLL on the validation logits of the stage it scales, with the
validation labels, and the same temperature is applied to the test logits. Examples:

    "TS"          base → TS                       (one run)
    "SWA+TS"      SWA → TS                        (one run)
    "Ens"         base → TS per member → mean     (members are calibrated before averaging)
    "Ens+TS"      base → TS per member → mean → TS
    "SWA+Ens+TS"  SWA → TS per member → mean → TS

Without member TS (``member_ts=False``), over-confident members would dominate the mean of
logits; the name then carries ``Ens-raw``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beyondloss.posthoc.temperature import TemperatureScaling

COMBINE_MODES = ("logits", "probs")


def ensemble_logits(member_logits: Tensor, combine: str = "logits") -> Tensor:
    """Combine members' logits ``(M, N, C)`` into ensemble logits ``(N, C)`` (float32 or wider).

    ``combine="logits"``: ``(1/M) Σ_m z_m``. ``combine="probs"``: ``log((1/M) Σ_m softmax(z_m))``,
    computed stably as ``logsumexp_m log_softmax(z_m) − log M``; its softmax is the mean of the
    members' probabilities.
    """
    if member_logits.ndim != 3 or member_logits.shape[0] == 0:
        raise ValueError(f"member_logits must be (M, N, C) with M > 0, got {member_logits.shape}")
    z = member_logits
    if not z.is_floating_point() or z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if combine == "logits":
        return z.mean(dim=0)
    if combine == "probs":
        return torch.logsumexp(torch.log_softmax(z, dim=2), dim=0) - math.log(z.shape[0])
    raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")


def _source_tag(source: str) -> str:
    """Display tag of a tracked model kind: "base" → "", "swa" → "SWA", "ema0.9" → "EMA0.9"."""
    if source == "base":
        return ""
    for kind in ("swa", "ema"):
        if source.startswith(kind):
            return kind.upper() + source[len(kind) :]
    return source


@dataclass(frozen=True)
class Composition:
    """A post-hoc pipeline: ``source → [TS per member → ensemble] → [TS]``.

    Attributes
    ----------
    source:
        Which tracked model's logits enter: ``"base"``, ``"swa"`` or ``"ema<decay>"`` (the kinds
        of :class:`beyondloss.posthoc.tracker.PosthocTracker`).
    ensemble:
        Whether members are combined (then the inputs carry a member axis ``M``).
    member_ts:
        Temperature-scale each member before combining (ignored without ``ensemble``).
    final_ts:
        Temperature-scale the (ensembled) result.
    combine:
        ``"logits"`` (mean of logits) or ``"probs"`` (log of mean probabilities).
    """

    source: str = "base"
    ensemble: bool = False
    member_ts: bool = True
    final_ts: bool = False
    combine: str = "logits"

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")

    @property
    def name(self) -> str:
        """Short name such as ``"SWA+Ens+TS"``; the untransformed base model is ``"base"``."""
        parts = [_source_tag(self.source)] if self.source != "base" else []
        if self.ensemble:
            ens = "Ens" + ("" if self.member_ts else "-raw")
            parts.append(ens + ("" if self.combine == "logits" else "-probs"))
        if self.final_ts:
            parts.append("TS")
        return "+".join(parts) if parts else "base"

    def apply(
        self, val_logits: Tensor, val_labels: Tensor, test_logits: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Transformed ``(val, test)`` logits, each ``(N_split, C)`` in float32 or wider.

        ``val_logits`` ``(M, N_val, C)`` and ``test_logits`` ``(M, N_test, C)`` with an ensemble,
        ``(N_val, C)`` and ``(N_test, C)`` without; ``val_labels`` ``(N_val,)`` fit every
        temperature.
        """
        member_dims = 3 if self.ensemble else 2
        if val_logits.ndim != member_dims or test_logits.ndim != member_dims:
            raise ValueError(
                f"{self.name} expects {member_dims}-d logits, got {val_logits.ndim}-d and "
                f"{test_logits.ndim}-d"
            )
        val, test = val_logits.float(), test_logits.float()
        if self.ensemble:
            if self.member_ts:
                scalers = [TemperatureScaling().fit(v, val_labels) for v in val]
                val = torch.stack([ts(v) for ts, v in zip(scalers, val, strict=True)])
                test = torch.stack([ts(t) for ts, t in zip(scalers, test, strict=True)])
            val = ensemble_logits(val, self.combine)
            test = ensemble_logits(test, self.combine)
        if self.final_ts:
            ts = TemperatureScaling().fit(val, val_labels)
            val, test = ts(val), ts(test)
        return val, test


def standard_compositions(
    sources: Sequence[str] = ("base", "swa"), ensemble: bool = True
) -> list[Composition]:
    """The paper's transform set for each source: ``X``, ``X+TS`` and, with ``ensemble``,
    ``X+Ens``, ``X+Ens+TS`` (``X`` is omitted from names for the base model, whose plain
    single-model entry is ``"base"``)."""
    out: list[Composition] = []
    for source in sources:
        out += [Composition(source), Composition(source, final_ts=True)]
        if ensemble:
            out += [
                Composition(source, ensemble=True),
                Composition(source, ensemble=True, final_ts=True),
            ]
    return out


class OutputEnsemble(nn.Module):
    """Members deployed as one model: ``forward`` is the mean of the members' outputs.

    For a classifier or a token model this is the mean of logits (the default combination of
    :func:`ensemble_logits`, without member temperature scaling); for a regressor, the mean
    prediction: an ensemble dynamics model, velocity field or policy is rolled out by a task's
    own ``evaluate`` as one model, each step feeding the *mean* prediction back. Members must
    map the same inputs to outputs of one shape.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        outputs = [member(*args, **kwargs) for member in self.members]
        return torch.stack(outputs).mean(dim=0)
