"""Command line: ``beyondloss ttf TASK [options]`` runs the test-time-feedback study.

The parser only turns text into a :class:`~beyondloss.study.ttf.StudySpec` (whose defaults and
validation are the library's) and calls :func:`~beyondloss.study.ttf.run_study`; the study's
markdown table is printed to stdout.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from beyondloss import __version__
from beyondloss.optim.factory import OPTIMIZER_NAMES
from beyondloss.study.ttf import DEFAULT_LRS, StudySpec, run_study
from beyondloss.tasks import SIZES, TASKS

_DEFAULTS = {spec_field.name: spec_field.default for spec_field in fields(StudySpec)}
"""The study's defaults, shown by ``--help`` and used when an option is omitted."""


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _optimizers(text: str) -> tuple[str, ...]:
    names = _names(text)
    if not names:
        raise argparse.ArgumentTypeError("give at least one optimizer")
    for name in names:
        if name not in OPTIMIZER_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZER_NAMES)})"
            )
    return tuple(names)


def _learning_rates(text: str) -> tuple[float, ...]:
    lrs = []
    for part in _names(text):
        try:
            lr = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
        if not (math.isfinite(lr) and lr > 0):
            raise argparse.ArgumentTypeError(f"learning rates must be positive, got {part!r}")
        lrs.append(lr)
    if not lrs:
        raise argparse.ArgumentTypeError("give at least one learning rate")
    return tuple(lrs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``beyondloss`` argument parser (task choices read from the registry when called)."""
    parser = argparse.ArgumentParser(
        prog="beyondloss",
        description="Train and select networks by their deployed performance, "
        "not their one-step validation loss.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ttf = commands.add_parser(
        "ttf",
        help="test-time-feedback study: optimizers × learning rates × seeds on one task",
        description="Train every (optimizer, learning rate, seed) on TASK, select each "
        "optimizer's learning rate by mean final one-step validation loss (and, separately, by "
        "the downstream validation metric), and report the deployed test metrics. Completed runs "
        "are skipped on a rerun. Results go to the store OUT/beyondloss.db; the study folder "
        "OUT/ttf-TASK-SIZE holds table.md, table.csv, curves.png and the run checkpoints.",
    )
    ttf.set_defaults(error=ttf.error)
    ttf.add_argument("task", metavar="TASK", choices=sorted(TASKS), help="task: %(choices)s")
    ttf.add_argument(
        "--size", choices=SIZES, default=_DEFAULTS["size"], help="task size (default: %(default)s)"
    )
    ttf.add_argument(
        "--optimizers",
        type=_optimizers,
        default=",".join(_DEFAULTS["optimizers"]),
        metavar="NAMES",
        help=f"comma-separated, from {', '.join(OPTIMIZER_NAMES)} (default: %(default)s)",
    )
    ttf.add_argument(
        "--seeds",
        type=_positive_int,
        default=_DEFAULTS["seeds"],
        help="number of seeds, 0..N-1, per configuration (default: %(default)s)",
    )
    ttf.add_argument(
        "--lrs",
        type=_learning_rates,
        default=None,
        metavar="LRS",
        help="comma-separated learning rates shared by all optimizers (default per size: "
        + "; ".join(f"{size} {','.join(map(str, lrs))}" for size, lrs in DEFAULT_LRS.items())
        + ")",
    )
    ttf.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=_DEFAULTS["weight_decay"],
        help="decoupled weight decay (default: %(default)s)",
    )
    ttf.add_argument(
        "--workers",
        type=_positive_int,
        default=_DEFAULTS["workers"],
        help="parallel training processes (default: %(default)s)",
    )
    ttf.add_argument(
        "--out", type=Path, default=_DEFAULTS["out"], help="output folder (default: %(default)s)"
    )
    ttf.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Invalid input exits through ``SystemExit(2)`` with argparse's usage message.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    try:
        spec = StudySpec(
            task=args.task,
            size=args.size,
            optimizers=args.optimizers,
            lrs=args.lrs,
            seeds=args.seeds,
            weight_decay=args.weight_decay,
            workers=args.workers,
            out=args.out,
        )
    except ValueError as error:
        args.error(str(error))
    result = run_study(
        spec, progress=not args.no_progress, command=shlex.join(["beyondloss", *arguments])
    )
    print(result.markdown)
    return 0
