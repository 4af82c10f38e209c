"""Command line: ``beyondloss study TASK [options]`` (alias ``ttf``) runs a study,
``beyondloss study all [options]`` the suite, ``beyondloss export`` writes the model a study
selects, ``beyondloss runs`` queries the results store and ``beyondloss posthoc`` runs the
post-hoc reversal preset.

The parser only turns text into :class:`~beyondloss.study.ttf.StudySpec` fields (whose defaults
and validation are the library's) and calls :func:`~beyondloss.study.ttf.run_study` or
:func:`~beyondloss.study.ttf.run_all`; the study's markdown report (or the summary over tasks) is
printed to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from beyondloss import __version__
from beyondloss.optim.config import APConfig
from beyondloss.optim.factory import OPTIMIZER_NAMES
from beyondloss.schedules import SCHEDULES
from beyondloss.store import ResultsStore, StoreError
from beyondloss.study.arguments import positive_int
from beyondloss.study.export import export_model, load_model
from beyondloss.study.posthoc_cli import add_posthoc_command
from beyondloss.study.ttf import (
    DEFAULT_LRS,
    DEFAULT_SEEDS,
    DOPR_SETTINGS,
    EXECUTORS,
    STORE_NAME,
    TRANSFORMS,
    StudySpec,
    run_all,
    run_study,
)
from beyondloss.tasks import QUICK_SUITE, SIZES, TASKS

_DEFAULTS = {spec_field.name: spec_field.default for spec_field in fields(StudySpec)}
"""The study's defaults, shown by ``--help`` and used when an option is omitted."""

ALL_TASKS = "all"
"""The TASK argument that runs the study on every registered task."""


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _optimizers(text: str) -> tuple[str, ...]:
    """Comma-separated optimizers: built-in names, plugin names or references (resolved and
    checked by the study spec, which names a bad one in its error)."""
    names = _names(text)
    if not names:
        raise argparse.ArgumentTypeError("give at least one optimizer")
    return tuple(names)


def _tasks(text: str) -> tuple[str, ...]:
    names = _names(text)
    unknown = [name for name in names if name not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown tasks {unknown} (choose from {', '.join(TASKS)})" if unknown else "no task"
        )
    return tuple(names)


def _number(text: str, valid: Callable[[float], bool], requirement: str) -> float:
    """``text`` as a float, or an argparse error: not a number, or not ``valid`` (the error
    then says ``requirement``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}")
    return value


def _numbers(text: str, valid: Callable[[float], bool], requirement: str, what: str) -> tuple:
    """Comma-separated :func:`_number` values, at least one (``what`` names them)."""
    values = tuple(_number(part, valid, requirement) for part in _names(text))
    if not values:
        raise argparse.ArgumentTypeError(f"give at least one {what}")
    return values


def _learning_rates(text: str) -> tuple[float, ...]:
    positive = lambda v: math.isfinite(v) and v > 0  # noqa: E731
    return _numbers(text, positive, "learning rates must be positive", "learning rate")


def _non_negative_float(text: str) -> float:
    return _number(text, lambda v: math.isfinite(v) and v >= 0, "must be finite and >= 0")


def _fractions(text: str) -> tuple[float, ...]:
    return _numbers(text, lambda v: 0.0 < v < 1.0, "decays must lie in (0, 1)", "decay")


def _warmup(text: str) -> float:
    return _number(text, lambda v: 0.0 <= v < 1.0, "must be a fraction in [0, 1)")


class _Removed(argparse.Action):
    """``--ema-decay``, which named DoPr's Σ EMA before the weight EMA had decays: refused with
    the two flags that replace it, so an old command line cannot change meaning silently."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        parser.error(
            f"{option_string} is ambiguous and no longer accepted: use --sigma-ema-decay for "
            "DoPr's Σ EMA, or --ema-decays for the decays of the per-step weight EMA"
        )


_PARSERS = {"float": float, "int": int, "str": str, "int | None": int}
"""How the command line reads each annotated type of an APConfig field."""


AP_FLAGS = {"ema_decay": "sigma-ema-decay"}
"""APConfig fields whose flag is not their name: DoPr's Σ EMA is ``--sigma-ema-decay``, so that
it cannot be mistaken for the weight EMA's ``--ema-decays``."""


def _ap_flag(name: str) -> str:
    return "--" + AP_FLAGS.get(name, name.replace("_", "-"))


def _add_ap_arguments(group: argparse._ArgumentGroup) -> None:
    """One flag per :class:`APConfig` field (``--cov-every``); the values are validated by
    APConfig itself when the study spec is built, so no setting is checked here twice."""
    for setting in fields(APConfig):
        choices = setting.metadata.get("choices")
        group.add_argument(
            _ap_flag(setting.name),
            dest=setting.name,
            type=None if choices else _PARSERS[setting.type],
            choices=choices,
            help=f"{setting.metadata['help']} (default: {setting.default})",
        )


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
        "study",
        aliases=["ttf"],
        help="optimizers × learning rates × seeds (× transforms) on one task, or the suite",
        description="Train every (optimizer, learning rate, seed) on TASK, select each "
        "optimizer's learning rate by mean final one-step validation loss (and, separately, by "
        "the downstream validation metric), and report the deployed test metrics with 95% "
        "confidence intervals over seeds, the paired gain of each dopr-X over X, and the "
        "Kendall tau between validation loss and the downstream metric. Completed runs are "
        "skipped on a rerun. Results go to the store OUT/beyondloss.db; the study folder "
        "OUT/ttf-TASK-SIZE holds report.md, table.csv, dopr_vs_base.csv, curves.png, "
        "val_loss_vs_downstream.png and the run checkpoints. TASK 'all' runs every registered "
        "task of the suite in turn (quick: one task per family; full: every task; or --tasks) "
        "and writes OUT/ttf-all-SIZE/summary.md.",
    )
    ttf.set_defaults(error=ttf.error)
    ttf.add_argument(
        "task",
        metavar="TASK",
        nargs="?",
        help=f"task: {', '.join([*sorted(TASKS), ALL_TASKS])} (all: every registered task in "
        "turn), an installed plugin's name, or your own factory (size, data_seed) -> Task as "
        "module:factory or path/to/file.py:factory",
    )
    _add_task_option(ttf)
    _add_study_arguments(ttf)
    ttf.add_argument(
        "--tasks",
        type=_tasks,
        default=None,
        metavar="NAMES",
        help="with TASK 'all': the tasks to study, comma-separated (default: quick "
        f"{','.join(QUICK_SUITE)}; full: every task)",
    )
    ttf.add_argument(
        "--workers",
        type=positive_int,
        default=_DEFAULTS["workers"],
        help="runs trained in parallel: local processes, or the CPUs of the Ray instance "
        "started for the study (default: %(default)s)",
    )
    ttf.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where runs execute: spawned local processes, or Ray tasks (needs the ray extra) "
        "(default: %(default)s)",
    )
    ttf.add_argument(
        "--address",
        default=None,
        help="with --executor ray: the Ray cluster to join (auto, host:port); default: start "
        "a local Ray instance with --workers CPUs",
    )
    ttf.add_argument(
        "--storage",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for the run folders (checkpoints), seen by every worker: on a Ray "
        "cluster, a shared file system; the store and reports stay in --out "
        "(default: under --out)",
    )
    ttf.add_argument(
        "--ddp",
        type=positive_int,
        default=1,
        metavar="N",
        help="processes per run: N > 1 trains each run data-parallel on N ranks (gloo on "
        "CPU), restarted from its checkpoint if a rank dies (default: %(default)s)",
    )
    ttf.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_posthoc_command(commands)
    _add_export_command(commands)
    _add_runs_command(commands)
    return parser


def _add_runs_command(commands: argparse._SubParsersAction) -> None:
    runs = commands.add_parser(
        "runs",
        help="query the runs of every study in a results store",
        description="One row per run of OUT/beyondloss.db (every study that wrote there): its "
        "axes (task, optimizer, lr, weight_decay, seed, status, and every config key, flattened: "
        "study, size, dopr.cov_every, transforms, ...) and the final value of the metrics asked "
        "for. The same table in Python: ResultsStore(path).final_frame(**filters).",
    )
    runs.set_defaults(error=runs.error)
    runs.add_argument(
        "--out", type=Path, default=_DEFAULTS["out"], help="output folder (default: %(default)s)"
    )
    runs.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="AXIS=VALUE",
        help="keep runs whose axis equals VALUE (repeatable), e.g. optimizer=dopr-adamw",
    )
    runs.add_argument(
        "--metrics",
        type=_names,
        default=[],
        metavar="NAMES",
        help="final metrics to show, comma-separated (default: none)",
    )
    runs.add_argument(
        "--columns", type=_names, default=None, metavar="NAMES", help="axes to show"
    )
    runs.add_argument("--csv", action="store_true", help="print CSV instead of a markdown table")


def _runs(args: argparse.Namespace) -> int:
    """``beyondloss runs``: filter the store's runs by their axes and print them."""
    database = args.out / STORE_NAME
    filters = {}
    for condition in args.where:
        axis, separator, text = condition.partition("=")
        if not separator or not axis:
            args.error(f"--where takes AXIS=VALUE, got {condition!r}")
        try:
            filters[axis] = json.loads(text)
        except json.JSONDecodeError:
            filters[axis] = text
    with ResultsStore(database, readonly=True) as store:
        try:
            frame = store.final_frame(**filters)
        except ValueError as error:
            args.error(str(error))
    columns = args.columns or ["run_id", "task", "optimizer", "lr", "weight_decay", "seed"]
    unknown = [name for name in [*columns, *args.metrics] if name not in frame.columns]
    if frame.empty:
        print("no run matches", file=sys.stderr)
        return 0
    if unknown:
        args.error(f"unknown axes or metrics {unknown}; the runs have {', '.join(frame.columns)}")
    table = frame[[*columns, *args.metrics]]
    print(table.to_csv(index=False) if args.csv else table.to_string(index=False))
    return 0


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write the weights of the model a study selects",
        description="Select a model among the complete runs of the study that `beyondloss ttf "
        "TASK` with the same options ran, by CRITERION: val_loss (naive), downstream (the "
        "downstream validation metric) or a transform of the study (post-hoc: swa, ema, ens, "
        "swa_ens, ...) or joint (the best val metric over every lr and model, the report's joint "
        "choice). The configuration is the study's selection (over all optimizers unless "
        "--optimizer names one); a single model is the seed with the best validation value. "
        "The model is rebuilt from the run checkpoints, written to OUTPUT, re-evaluated on the "
        "test split and compared with the stored test metrics. Load it with "
        "beyondloss.study.export.load_model.",
    )
    export.set_defaults(error=export.error)
    export.add_argument(
        "task",
        metavar="TASK",
        nargs="?",
        help="the study's task, as given to `beyondloss study`",
    )
    _add_task_option(export)
    _add_study_arguments(export)
    export.add_argument(
        "--select",
        default="downstream",
        metavar="CRITERION",
        help="val_loss, downstream, a transform name (post-hoc), or joint: the best val "
        "metric over every lr and model, as the report's joint column (default: %(default)s)",
    )
    export.add_argument("--optimizer", help="select among this optimizer's runs only")
    export.add_argument("--output", "-o", type=Path, required=True, help="file to write")


def _add_task_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        dest="task_option",
        metavar="TASK",
        help="the task, instead of the TASK argument (e.g. --task mypkg.tasks:make_task)",
    )


def _task(args: argparse.Namespace) -> str:
    """The task of ``study`` or ``export``: the TASK argument or ``--task``, exactly one."""
    if (args.task is None) == (args.task_option is None):
        args.error("give the task once: as TASK or as --task")
    return args.task if args.task is not None else args.task_option


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name a study's grid (shared by ``ttf`` and ``export``)."""
    ttf = parser
    ttf.add_argument(
        "--size", choices=SIZES, default=_DEFAULTS["size"], help="task size (default: %(default)s)"
    )
    ttf.add_argument(
        "--optimizers",
        type=_optimizers,
        default=",".join(_DEFAULTS["optimizers"]),
        metavar="NAMES",
        help=f"comma-separated: {', '.join(OPTIMIZER_NAMES)}, an installed plugin's name, or your "
        "own factory (model, lr, weight_decay) -> Optimizer as module:factory, "
        "path/to/file.py:factory or name=module:factory (default: %(default)s)",
    )
    ttf.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="number of seeds, 0..N-1, per configuration (default per size: "
        + "; ".join(f"{size} {seeds}" for size, seeds in DEFAULT_SEEDS.items())
        + ")",
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
        "--transforms",
        type=_names,
        default=(),
        metavar="NAMES",
        help=f"transforms rolled out beside the base model, some of {','.join(TRANSFORMS)}: "
        "weight averages (swa: end-of-epoch weights of the second half; ema: every optimizer "
        "step, one per --ema-decays; epoch-ema: end-of-epoch weights, decay 0.9) evaluated "
        "every K epochs, temperature scaling (ts, classifiers: "
        "noisy-*) of the base model and of each average, the seed ensemble (ens) at the final "
        "epoch (default: none)",
    )
    ttf.add_argument(
        "--metric",
        default=None,
        help="downstream metric to select and report by, e.g. nll on a noisy-* task (default: "
        "the task's primary metric)",
    )
    ttf.add_argument(
        "--ema-decays",
        type=_fractions,
        default=_DEFAULTS["ema_decays"],
        metavar="DECAYS",
        help="per-step decays of the ema transform, comma-separated in (0, 1): one weight EMA "
        "per decay in every run (default: "
        + ",".join(f"{d:g}" for d in _DEFAULTS["ema_decays"])
        + ")",
    )
    ttf.add_argument(
        "--ema-decay",
        action=_Removed,
        nargs="?",
        help=argparse.SUPPRESS,
    )
    ttf.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=_DEFAULTS["schedule"],
        help="learning-rate schedule of every run, stepped per optimizer step (default: "
        "%(default)s)",
    )
    ttf.add_argument(
        "--warmup",
        type=_warmup,
        default=_DEFAULTS["warmup"],
        metavar="FRACTION",
        help="fraction of each run's steps in linear lr warmup, in [0, 1) (default: %(default)s)",
    )
    ttf.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="training epochs of every run, overriding the task's budget (default: the task's)",
    )
    ttf.add_argument(
        "--transform-every",
        type=positive_int,
        default=_DEFAULTS["transform_every"],
        help="evaluate the transforms every K epochs and at the last (default: %(default)s)",
    )
    ttf.add_argument(
        "--eval-every",
        type=positive_int,
        default=_DEFAULTS["eval_every"],
        metavar="K",
        help="roll out the base model (downstream metrics) every K epochs and at the last; "
        "val loss is evaluated every epoch (default: %(default)s)",
    )
    dopr = ttf.add_argument_group(
        "DoPr settings", "activation preconditioner of the dopr-* optimizers (default: DoPr's)"
    )
    _add_ap_arguments(dopr)
    ttf.add_argument(
        "--out", type=Path, default=_DEFAULTS["out"], help="output folder (default: %(default)s)"
    )


def _export(args: argparse.Namespace, study: dict) -> int:
    """``beyondloss export``: select, rebuild, write, then check the rebuilt model's test
    metrics against the stored ones (one torch thread, as the runs were evaluated)."""
    try:
        spec = StudySpec(task=args.task, size=args.size, **study)
        selected = export_model(spec, args.output, args.select, args.optimizer)
    except ValueError as error:
        args.error(str(error))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task, model, _ = load_model(args.output)
        rebuilt = task.evaluate(model, "test")
    finally:
        torch.set_num_threads(threads)
    print(
        f"{args.output}: {selected.kind} model of {', '.join(selected.run_ids)} "
        f"({selected.optimizer}, lr {selected.lr:g}; selected by {selected.metric})"
    )
    mismatched = []
    for name, value in selected.stored.items():
        again = rebuilt.get(name, math.nan)
        same = again == value or (math.isnan(again) and math.isnan(value))
        mismatched += [] if same else [name]
        flag = "" if same else "  DIFFERS"
        print(f"  test {name}: stored {value:.6g}, rebuilt {again:.6g}{flag}")
    if mismatched:
        print(
            f"rebuilt test metrics differ from the stored ones: {', '.join(mismatched)}",
            file=sys.stderr,
        )
        return 1
    return 0


def study_fields(args: argparse.Namespace) -> dict:
    """The :class:`StudySpec` fields that name a study's runs, from parsed ``study`` or
    ``export`` arguments (the executor's fields are added by :func:`main`)."""
    return {
        "optimizers": args.optimizers,
        "lrs": args.lrs,
        "seeds": args.seeds,
        "weight_decay": args.weight_decay,
        "dopr": {
            key: getattr(args, key) for key in DOPR_SETTINGS if getattr(args, key) is not None
        },
        "transforms": tuple(args.transforms),
        "ema_decays": args.ema_decays,
        "schedule": args.schedule,
        "warmup": args.warmup,
        "epochs": args.epochs,
        "transform_every": args.transform_every,
        "eval_every": args.eval_every,
        "metric": args.metric,
        "out": args.out,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Invalid input exits through ``SystemExit(2)`` with argparse's usage message. ``ttf all``
    returns 1 if a task's study failed (its traceback goes to stderr), 0 otherwise.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    try:
        return _command(args, arguments)
    except StoreError as error:
        print(f"beyondloss {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"beyondloss {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C left: for a study, how many of its runs the store holds complete (the
    runs in flight resume from their checkpoints on a rerun)."""
    if args.command not in ("study", "ttf"):
        return "interrupted"
    database = args.out / STORE_NAME
    if not database.is_file():
        return "interrupted; no run stored"
    with ResultsStore(database, readonly=True) as store:
        if args.task == ALL_TASKS:
            done = sum(run["status"] == "complete" for run in store.runs())
        else:
            spec = StudySpec(task=args.task, size=args.size, **study_fields(args))
            done = sum(store.is_complete(spec.run_id(*key)) for key in spec.grid())
    return f"interrupted; {done} runs stored; rerun to resume"


def _command(args: argparse.Namespace, arguments: list[str]) -> int:
    """Run the parsed command (see :func:`main`)."""
    if args.command in ("study", "ttf", "export"):
        args.task = _task(args)
    if args.command == "posthoc":
        return args.func(args)
    if args.command == "runs":
        return _runs(args)
    study = study_fields(args)
    if args.command == "export":
        return _export(args, study)
    study["workers"] = args.workers
    if args.executor != "local" or args.address is not None:
        study |= {"executor": args.executor, "address": args.address}
    if args.storage is not None:
        study["storage"] = args.storage
    if args.ddp != 1:
        study["ddp"] = args.ddp
    command = shlex.join(["beyondloss", *arguments])
    progress = not args.no_progress
    if args.tasks is not None and args.task != ALL_TASKS:
        args.error(f"--tasks applies to TASK 'all' only, not {args.task!r}")
    if args.metric is not None and args.task == ALL_TASKS:
        args.error("--metric applies to one TASK, not 'all' (tasks have different metrics)")
    if args.task == ALL_TASKS:
        del study["metric"]
    if args.task == ALL_TASKS:
        try:
            suite = run_all(
                args.size, progress=progress, command=command, tasks=args.tasks, **study
            )
        except ValueError as error:
            args.error(str(error))
        for failure in suite.failures.values():
            print(failure, file=sys.stderr)
        print(suite.markdown)
        return 1 if suite.failures else 0
    try:
        spec = StudySpec(task=args.task, size=args.size, **study)
    except ValueError as error:
        args.error(str(error))
    if spec.executor == "ray" and importlib.util.find_spec("ray") is None:
        args.error("--executor ray needs Ray: pip install 'beyondloss[ray]'")
    try:
        if spec.address is not None:
            from beyondloss.study.ray_executor import check_reachable

            check_reachable(spec.address)  # before anything is written
        result = run_study(spec, progress=progress, command=command)
    except ConnectionError as error:
        print(f"beyondloss study: cannot reach the Ray cluster: {error}", file=sys.stderr)
        return 1
    print(result.markdown)
    return 0
