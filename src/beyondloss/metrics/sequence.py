"""Metrics of generated token sequences against their targets: exact match and token accuracy.

Conventions (shared by every function here): ``generated`` and ``target`` are integer tensors
of shape ``(n, L)`` — ``n`` sequences of ``L`` answer tokens — compared position by position:
token ``k`` of a generation is right only if it equals token ``k`` of its target. A generation
that drops or inserts a token is therefore wrong at every later position, which is how errors
that compound along a greedy decode show up in the token accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def _check(generated: Tensor, target: Tensor) -> None:
    if generated.shape != target.shape:
        raise ValueError(
            f"generated and target must have the same shape, got {tuple(generated.shape)} "
            f"and {tuple(target.shape)}"
        )
    if generated.ndim != 2 or generated.shape[1] == 0:
        raise ValueError(f"sequences must have shape (n, L) with L >= 1, got {generated.shape}")


def token_matches(generated: Tensor, target: Tensor) -> Tensor:
    """Whether each token is right: bool tensor of shape ``(n, L)``."""
    _check(generated, target)
    return generated == target


def exact_match(generated: Tensor, target: Tensor) -> Tensor:
    """Whether each sequence is right at every position: bool tensor of shape ``(n,)``."""
    return token_matches(generated, target).all(dim=1)


def pooled_mean(groups: Mapping[Any, Tensor]) -> float:
    """Mean of all values of all groups (e.g. one group per length), each value counted once.

    With :func:`exact_match` values it is the fraction of sequences that are right; with
    :func:`token_matches` values (any shape, flattened) the per-token accuracy pooled over every
    answer token, so longer sequences weigh more. At least one value overall is required.
    """
    values = [group.double().reshape(-1) for group in groups.values()]
    pooled = torch.cat(values) if values else torch.empty(0)
    if pooled.numel() == 0:
        raise ValueError("pooled_mean needs at least one value")
    return float(pooled.mean())
