"""The ``posthoc`` subcommand: ``beyondloss posthoc DATASET [options]``.

:func:`add_posthoc_command` registers it on the ``beyondloss`` parser's subparsers; its handler
(``args.func(args)``) runs :func:`~beyondloss.study.posthoc.run_posthoc_study` and prints the
selection table and the reversal report. Defaults and validation of the study are the
library's; the parser only turns text into arguments.
"""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path

from beyondloss.study.arguments import positive_int
from beyondloss.study.posthoc import run_posthoc_study
from beyondloss.tasks.noisy_labels import DATASETS, NOISE_KINDS


def _numbers(text: str, allow_zero: bool) -> tuple[float, ...]:
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"values must be finite and {bound}, got {part!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return tuple(values)


def _learning_rates(text: str) -> tuple[float, ...]:
    return _numbers(text, allow_zero=False)


def _weight_decays(text: str) -> tuple[float, ...]:
    return _numbers(text, allow_zero=True)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"the noise rate must be in [0, 1], got {text!r}")
    return value


def posthoc_command_line(args: argparse.Namespace) -> str:
    """The canonical command line of parsed ``args``, every option spelled out (as recorded in
    ``report.md``), e.g. ``beyondloss posthoc digits --noise 0.4 --noise-kind symmetric ...``."""
    words = ["beyondloss", "posthoc", args.dataset, "--noise", f"{args.noise:g}"]
    words += ["--noise-kind", args.noise_kind, "--seeds", str(args.seeds)]
    if args.lrs is not None:
        words += ["--lrs", ",".join(f"{lr:g}" for lr in args.lrs)]
    if args.weight_decays is not None:
        words += ["--weight-decays", ",".join(f"{wd:g}" for wd in args.weight_decays)]
    words += ["--workers", str(args.workers), "--out", str(args.out)]
    return shlex.join(words)


def run_posthoc_command(args: argparse.Namespace) -> int:
    """Handler of ``posthoc``: run the study, print its table and reversal report; returns 0."""
    try:
        result = run_posthoc_study(
            args.dataset,
            noise=args.noise,
            noise_kind=args.noise_kind,
            seeds=args.seeds,
            lrs=args.lrs,
            weight_decays=args.weight_decays,
            out=args.out,
            workers=args.workers,
            progress=not args.no_progress,
            command=posthoc_command_line(args),
        )
    except ValueError as error:  # the grid's size: every other value is checked by the parser
        args.error(str(error))
    print(result.markdown)
    print()
    print(result.reversal)
    return 0


def add_posthoc_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``posthoc`` on ``subparsers`` (from ``parser.add_subparsers()``) with
    ``func=run_posthoc_command`` as its handler; returns the subcommand's parser."""
    datasets = sorted(DATASETS)
    parser = subparsers.add_parser(
        "posthoc",
        help="post-hoc reversal study on noisy labels: naive vs post-hoc selection",
        description="Train seeds × (lr, weight decay) configs on DATASET with synthetic label "
        "noise, tracking the base model and its SWA on val and test each epoch; then select "
        "epochs and configs naively (by the base model's val metric) and post hoc (by the val "
        "metric after TS, SWA, ensembling and their compositions), and report test error and "
        "NLL on noisy and clean labels. Completed runs are skipped on a rerun. Writes "
        "report.md, table.csv, reversal.md and curves.png to OUT/posthoc-DATASET-KINDRATE.",
    )
    parser.add_argument(
        "dataset", metavar="DATASET", choices=datasets, help=f"one of {', '.join(datasets)}"
    )
    parser.add_argument(
        "--noise", type=_rate, default=0.4, help="label-noise rate in [0, 1] (default: %(default)s)"
    )
    parser.add_argument(
        "--noise-kind",
        choices=NOISE_KINDS,
        default="symmetric",
        help="symmetric: a flipped label becomes a uniformly random other class; class: class c "
        "becomes (c + 1) mod C (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=8, help="runs per config (default: %(default)s)"
    )
    parser.add_argument(
        "--lrs",
        type=_learning_rates,
        default=None,
        metavar="LRS",
        help="comma-separated learning rates (default: the dataset's; "
        + "; ".join(f"{name} {DATASETS[name].lr:g}" for name in datasets)
        + ")",
    )
    parser.add_argument(
        "--weight-decays",
        type=_weight_decays,
        default=None,
        metavar="WDS",
        help="comma-separated decoupled weight decays (default: the dataset's; "
        + "; ".join(f"{name} {DATASETS[name].weight_decay:g}" for name in datasets)
        + ")",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="parallel training processes (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="output folder (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run_posthoc_command, error=parser.error)
    return parser
