"""argparse value types shared by the command-line front ends."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer ≥ 1, or an argparse error naming the bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
