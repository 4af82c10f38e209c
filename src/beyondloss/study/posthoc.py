"""The post-hoc reversal study on noisy labels: train seeds × configs, then select two ways.

For one dataset (:data:`beyondloss.tasks.noisy_labels.DATASETS`) at one noise rate and kind,
as a :class:`~beyondloss.tasks.noisy_labels.NoisyLabelTask`, every ``(lr, weight decay, seed)``
is a :class:`~beyondloss.study.ttf.RunJob` of the study engine: the same run ids, "done" rule,
executor and training of a run (:func:`beyondloss.study.ttf.train_runs`) as every other study,
with a :class:`~beyondloss.evaluation.LogitsEvaluator` as the run's evaluator: SWA of the
end-of-epoch weights from epoch 1, logits of the base model and of its SWA on val and test
after every epoch, kept in the run's checkpoint. Temperatures are fitted on val (noisy labels), per
epoch, inside each transform (:class:`~beyondloss.posthoc.ensemble.Composition`).

Selection (:mod:`beyondloss.selection.posthoc`) compares, for each of :data:`TRANSFORMS`,

* **naive**: each run's epoch (and the config) by the *base* model's val metric, the transform
  applied there; an ensemble's members each at their own naive epoch;
* **post-hoc**: epoch (and config) by the *transformed* model's val metric; one shared epoch
  for an ensemble,

with the selection metric ``m`` (error, then NLL) on val with noisy labels and the test metric
of the same name reported on noisy and on clean test labels. ``gain = naive − post-hoc``:
positive when post-hoc selection is better. This is done for the default config alone and,
when the grid has more than one config, over the grid (config chosen by the same rule).

Layout under ``out``: the results store ``beyondloss.db`` (shared with the other studies; one
row per run and per (epoch, metric)) and the study folder ``posthoc-<dataset>-<kind><noise>/``
holding ``runs/<run id>/checkpoint.pt`` (written atomically after every epoch; it holds the
run's :class:`~beyondloss.posthoc.tracker.PosthocLog` and SWA), ``report.md``, ``report.html``,
``table.csv``, ``reversal.md`` and ``curves.png``. A run the store marks complete is skipped on
a rerun; an interrupted one resumes from its checkpoint with its logits and SWA.

Runs execute in ``workers`` spawned processes with one torch thread each, and so do the curves
of the transforms (temperature fits and metrics per run and epoch, the bulk of selection) when
``workers > 1``. Every run builds the same data (data seed of the dataset) and seeds torch with
its own seed, so its result does not depend on the worker that ran it.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beyondloss.posthoc.ensemble import Composition
from beyondloss.posthoc.tracker import PosthocLog
from beyondloss.selection.curves import CurveBook, Curves, transform_curves
from beyondloss.selection.posthoc import compare_selection, config_reversal
from beyondloss.selection.reversal import reversal_table
from beyondloss.store import check_output_folder
from beyondloss.study.executor import LocalExecutor
from beyondloss.study.html import write_report
from beyondloss.study.report import replacing, save_figure
from beyondloss.study.ttf import (
    STORE_NAME,
    RunJob,
    check_grid_size,
    grid_values,
    pending_runs,
    run_id,
    train_runs,
)
from beyondloss.tasks.noisy_labels import (
    DATASETS,
    NOISE_KINDS,
    NoisyLabelData,
    NoisyLabelDataset,
    make_noisy_task,
)
from beyondloss.train import CHECKPOINT_NAME

TRANSFORMS = (
    Composition("base"),
    Composition("base", final_ts=True),
    Composition("swa"),
    Composition("swa", final_ts=True),
    Composition("base", ensemble=True),
    Composition("base", ensemble=True, final_ts=True),
    Composition("swa", ensemble=True),
    Composition("swa", ensemble=True, final_ts=True),
)
"""base, TS, SWA, SWA+TS, Ens, Ens+TS, SWA+Ens, SWA+Ens+TS (ensembles need two seeds or more).
Ensembles temperature-scale their members before the mean of logits."""

PLOTTED = ("base", "SWA+TS", "SWA+Ens+TS")
"""Transforms drawn in ``curves.png``."""

SELECTION_METRICS = ("error", "nll")
"""Val metrics that select; each table reports the test metric of the same name."""

_SPLITS = (("val", "val"), ("test", "test"), ("test_clean", "clean test"))


@dataclass(frozen=True)
class PosthocStudyResult:
    """Outcome of :func:`run_posthoc_study`.

    Attributes
    ----------
    directory:
        The study folder (``report.md``, ``table.csv``, ``reversal.md``, ``curves.png``,
        ``runs/``).
    trained, skipped:
        Run ids trained by this call and run ids whose log already existed, in grid order.
    rows:
        The rows of ``table.csv``: one per (scope, selection metric, transform), with
        ``scope`` ``"default"`` or ``"grid"`` and the columns of
        :func:`~beyondloss.selection.posthoc.compare_selection`.
    markdown, reversal:
        The contents of ``report.md`` and ``reversal.md``.
    wall_seconds:
        Wall time of the call up to writing ``report.md``.
    """

    directory: Path
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    markdown: str
    reversal: str
    wall_seconds: float


def study_name(dataset: str, noise: float, kind: str) -> str:
    """Folder name of a study, e.g. ``posthoc-digits-symmetric0.4``."""
    return f"posthoc-{dataset}-{kind}{noise:g}"


def config_name(lr: float, weight_decay: float) -> str:
    """Name of a grid config in tables, e.g. ``lr=0.0001,wd=0``."""
    return f"lr={lr:g},wd={weight_decay:g}"


def run_job(
    dataset: NoisyLabelDataset, noise: float, kind: str, lr: float, wd: float, seed: int, out: Path
) -> RunJob:
    """The engine's job of one run, e.g. id ``noisy-digits-symmetric0.4-full-adamw-lr0.0001-s3``
    (``-wd<value>`` before the seed for a non-zero weight decay)."""
    task = f"noisy-{dataset.name}-{kind}{noise:g}"
    study = study_name(dataset.name, noise, kind)
    name = run_id(task, "full", dataset.optimizer, lr, seed, f"-wd{wd:g}" if wd else "")
    return RunJob(
        run_id=name,
        factory=partial(make_noisy_task, dataset=dataset, noise=noise, kind=kind),
        task=task,
        size="full",
        optimizer=dataset.optimizer,
        lr=lr,
        weight_decay=wd,
        dopr={},
        seed=seed,
        run_dir=out / study / "runs" / name,
        db=out / STORE_NAME,
        study=study,
        data_seed=dataset.data_seed,
        track_logits=True,
    )


@contextmanager
def _single_thread() -> Iterator[None]:
    """One torch thread in this process while the study runs: its tensor work (temperature
    fits and metrics on a few thousand logits) is too small to gain from intra-op threads,
    which would only compete with the worker processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_single_thread()
def run_posthoc_study(
    dataset: str | NoisyLabelDataset,
    noise: float = 0.4,
    noise_kind: str = "symmetric",
    seeds: int = 8,
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
    out: str | os.PathLike[str] = "runs",
    workers: int = 2,
    progress: bool = True,
    command: str | None = None,
) -> PosthocStudyResult:
    """Train every ``(lr, weight decay, seed)`` run, select naive vs post-hoc, write the report.

    Parameters
    ----------
    dataset:
        A name in :data:`~beyondloss.tasks.noisy_labels.DATASETS` or a
        :class:`~beyondloss.tasks.noisy_labels.NoisyLabelDataset` (its ``name`` identifies its
        runs: a changed dataset needs a new name or a new ``out``).
    noise, noise_kind:
        Label-noise rate in [0, 1] and kind (one of
        :data:`~beyondloss.tasks.noisy_labels.NOISE_KINDS`), applied to train, val and test.
    seeds:
        Runs per config, seeds ``0 .. seeds − 1``; ensembles need ``seeds >= 2``.
    lrs, weight_decays:
        The grid is their product; ``None`` gives the dataset's ``lr`` (``weight_decay``). The
        default config is the dataset's ``(lr, weight_decay)`` when it is in the grid, else the
        first config.
    out:
        Folder of the results store and the study folder.
    workers:
        Spawned processes (one torch thread each) training the runs in parallel; with more
        than one they also compute the transforms' curves, with one this process does.
    progress:
        A tqdm bar over runs (and one over curve computations) on stderr.
    command:
        The command line recorded in ``report.md``; ``None`` records this call.

    Raises ``ValueError`` for invalid arguments or a stored log of another length, and
    ``RuntimeError`` naming the run if a run fails (finished runs keep their logs). The call
    runs with one torch thread in this process (restored on return).
    """
    began = time.perf_counter()
    spec = _check_arguments(dataset, noise, noise_kind, seeds, workers)
    grid_lrs = grid_values("lrs", lrs if lrs is not None else [spec.lr], allow_zero=False)
    grid_wds = grid_values(
        "weight_decays",
        weight_decays if weight_decays is not None else [spec.weight_decay],
        allow_zero=True,
    )
    check_grid_size(len(grid_lrs) * len(grid_wds) * seeds, "lrs × weight decays × seeds")
    configs = list(product(grid_lrs, grid_wds))
    default = next((c for c in configs if c == (spec.lr, spec.weight_decay)), configs[0])
    out = Path(out)
    directory = out / study_name(spec.name, noise, noise_kind)
    check_output_folder(out)
    directory.mkdir(parents=True, exist_ok=True)
    call = f"run_posthoc_study({spec.name!r}, noise={noise:g}, noise_kind={noise_kind!r}, "
    call += f"seeds={seeds}, lrs={list(grid_lrs)}, weight_decays={list(grid_wds)}, "
    command = command or call + f"out={str(out)!r}, workers={workers})"
    jobs = [
        run_job(spec, noise, noise_kind, lr, wd, seed, out)
        for lr, wd in configs
        for seed in range(seeds)
    ]
    transforms = [c for c in TRANSFORMS if seeds > 1 or not c.ensemble]
    (trained, skipped), grid, book = _train_and_track(jobs, transforms, workers, progress)
    default_name = config_name(*default)
    default_book = _Book({default_name: grid[default_name]}, book.computed)
    rows = _selection_rows(grid, book, default_book, transforms)
    curves = {c.name: default_book.curves(default_name, c) for c in transforms}
    data = spec.build(noise, noise_kind)
    with replacing(directory / "curves.png") as path:
        _plot(path, curves, f"{directory.name}, {default_name}, {seeds} seeds")
    reversal = _reversal_markdown(directory.name, curves, book, transforms)
    _write_tables(directory, reversal, rows)
    wall_seconds = time.perf_counter() - began
    header = [
        f"# Post-hoc selection study `{directory.name}`",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_seconds:.1f} s ({len(trained)} runs trained, {len(skipped)} already "
        f"complete; {workers} workers)",
        "",
        _setup_text(spec, data, noise, noise_kind, seeds, configs),
    ]
    markdown = _table_markdown(header, default_name, len(configs), rows)
    write_report(directory, markdown, directory.name)
    return PosthocStudyResult(
        directory=directory,
        trained=trained,
        skipped=skipped,
        rows=tuple(rows),
        markdown=markdown,
        reversal=reversal,
        wall_seconds=wall_seconds,
    )


def _write_tables(directory: Path, reversal: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``reversal.md`` and ``table.csv`` in the study folder, each atomically."""
    with replacing(directory / "reversal.md") as path:
        path.write_text(reversal + "\n")
    with replacing(directory / "table.csv") as path:
        _write_csv(path, rows)


def _selection_rows(
    grid: Mapping[str, Sequence[PosthocLog]],
    book: _Book,
    default_book: _Book,
    transforms: Sequence[Composition],
) -> list[dict[str, Any]]:
    """Naive vs post-hoc selection rows per selection metric and transform: over the default
    config's epochs (scope ``"default"``) and, with several configs, over the grid."""
    scopes = [("default", default_book)] + ([("grid", book)] if len(grid) > 1 else [])
    return [
        {"scope": scope} | row
        for scope, scoped in scopes
        for metric in SELECTION_METRICS
        for row in compare_selection(scoped.grid, transforms, metric, scoped)
    ]


def _check_arguments(
    dataset: str | NoisyLabelDataset, noise: float, noise_kind: str, seeds: int, workers: int
) -> NoisyLabelDataset:
    """The dataset named by ``dataset``; ``ValueError`` for any invalid argument."""
    spec = DATASETS[dataset] if isinstance(dataset, str) and dataset in DATASETS else dataset
    if not isinstance(spec, NoisyLabelDataset):
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if noise_kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise_kind!r}; expected one of {NOISE_KINDS}")
    for name, value in (("seeds", seeds), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return spec


def _train_and_track(
    jobs: Sequence[RunJob], transforms: Sequence[Composition], workers: int, progress: bool
) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], dict[str, list[PosthocLog]], _Book]:
    """Train the runs not yet complete in the pool, load every run's log by config, and compute
    the curves of every transform of every config (in the pool when ``workers > 1``); the run
    ids trained and skipped, the logs and the curves."""
    epochs = jobs[0].factory(jobs[0].size, jobs[0].data_seed).epochs
    paths: dict[str, list[Path]] = {}
    for job in jobs:
        paths.setdefault(config_name(job.lr, job.weight_decay), []).append(job.run_dir)
    pending = pending_runs(jobs)
    with LocalExecutor(workers) as pool:
        done = train_runs(pool, jobs, pending, "training", progress)
        grid = {g: [_load(path, epochs) for path in ps] for g, ps in paths.items()}
        tasks = [(g, c) for g in grid for c in transforms]
        names = [f"{c.name} of {g}" for g, c in tasks]
        if workers > 1:
            calls = [(_curves_one, tuple(paths[g]), c) for g, c in tasks]
            computed = pool.run(calls, names, "curves", progress)
        else:
            calls = [(transform_curves, grid[g], c) for g, c in tasks]
            computed = LocalExecutor(0).run(calls, names, "curves", progress)
    return done, grid, _Book(grid, dict(zip(tasks, computed, strict=True)))


class _Book(CurveBook):
    """A :class:`CurveBook` whose curves were computed elsewhere (in the worker pool)."""

    def __init__(
        self,
        grid: Mapping[str, Sequence[PosthocLog]],
        computed: Mapping[tuple[str, Composition], Curves],
    ) -> None:
        super().__init__(grid)
        self.computed = computed

    def curves(self, config: str, composition: Composition) -> Curves:
        return self.computed[(config, composition)]


def _read_log(run_dir: Path) -> PosthocLog:
    """The tracker's log in the checkpoint of the run at ``run_dir``."""
    payload = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    return PosthocLog.from_tensors(payload["evaluators"][0])


def _load(path: Path, epochs: int) -> PosthocLog:
    """The log of the run at ``path``; ``ValueError`` unless it spans epochs ``1..epochs``."""
    log = _read_log(path)
    if log.epochs != list(range(1, epochs + 1)):
        raise ValueError(
            f"{path} holds {len(log.epochs)} epochs, the dataset trains {epochs}: use "
            "another out folder or another dataset name"
        )
    return log


@lru_cache(maxsize=1)
def _logs(paths: tuple[Path, ...]) -> list[PosthocLog]:
    """The logs of one config, kept while a worker computes that config's transforms."""
    return [_read_log(path) for path in paths]


def _curves_one(paths: tuple[Path, ...], composition: Composition) -> Curves:
    """Curves of ``composition`` over the runs at ``paths`` (in a worker)."""
    return transform_curves(_logs(paths), composition)


def _format(metric: str, value: float, gain: bool = False) -> str:
    """Error in percent (2 decimals), NLL in nats (4 decimals); gains carry a sign."""
    if metric == "error":
        return f"{100 * value:+.2f}" if gain else f"{100 * value:.2f}"
    return f"{value:+.4f}" if gain else f"{value:.4f}"


def _epochs(epochs: Sequence[int]) -> str:
    """Selected epochs of the runs: the single value, or their mean with min–max."""
    if len(set(epochs)) == 1:
        return str(epochs[0])
    return f"{np.mean(epochs):.1f} ({min(epochs)}–{max(epochs)})"


def _selection_table(rows: Sequence[Mapping[str, Any]], metric: str, grid: bool) -> str:
    """Markdown table of the rows selected by val ``metric``: test ``metric`` on noisy and
    clean labels, naive vs post-hoc, with the gain."""
    unit = "%" if metric == "error" else "nats"
    head = ["transform"] + (["config naive", "config post-hoc"] if grid else [])
    head += ["epoch naive", "epoch post-hoc"]
    for label in ("test", "clean test"):
        head += [f"{label} {metric} naive ({unit})", "post-hoc", "gain"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for row in rows:
        if row["metric"] != metric:
            continue
        cells = [row["transform"]]
        if grid:
            cells += [row["config_naive"], row["config_posthoc"]]
        cells += [_epochs(row["epochs_naive"]), _epochs(row["epochs_posthoc"])]
        for key in (f"test_{metric}", f"test_clean_{metric}"):
            cells += [
                _format(metric, row[f"{key}_naive"]),
                _format(metric, row[f"{key}_posthoc"]),
                _format(metric, row[f"{key}_gain"], gain=True),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setup_text(
    spec: NoisyLabelDataset,
    data: NoisyLabelData,
    noise: float,
    kind: str,
    seeds: int,
    configs: Sequence[tuple[float, float]],
) -> str:
    """The paragraph of ``report.md`` that says what was trained and how it is selected."""
    n_val = data.val.labels.numel()
    network = spec.make_model(data.n_features, data.n_classes)
    n_params = sum(p.numel() for p in network.parameters())
    model = getattr(spec.make_model, "__name__", type(network).__name__)
    rates = ", ".join(
        f"{split} {100 * float((noisy != clean).double().mean()):.1f} % of {noisy.numel()}"
        for split, noisy, clean in (
            ("train", data.train.tensors[1], data.train_clean),
            ("val", data.val.labels, data.val.clean_labels),
            ("test", data.test.labels, data.test.clean_labels),
        )
    )
    paragraphs = [
        f"Dataset `{spec.name}` ({data.n_features} features, {data.n_classes} classes), "
        f"{kind} label noise at rate {noise:g}; realised flips: {rates}. Val and test carry the "
        "noisy labels (selection uses val); clean-label test metrics are reported beside. "
        f"Val standard error of an error rate ≤ {50 / math.sqrt(n_val):.1f} points "
        f"(0.5/√{n_val}).",
        f"Model `{model}` ({n_params:,} parameters), optimizer {spec.optimizer}, "
        f"{spec.epochs} epochs of batch {spec.batch_size}, seeds 0–{seeds - 1}; configs "
        f"{', '.join(config_name(*c) for c in configs)}. SWA averages end-of-epoch weights from "
        "epoch 1; every temperature is fitted on val; ensembles average the seeds' logits after "
        "per-member TS.",
        "",
        "Naive: epoch (and config) by the base model's val metric, transform applied there "
        "(ensemble members each at their own epoch). Post-hoc: epoch (and config) by the "
        "transformed model's val metric (one shared epoch for ensembles). Test values are means "
        "over seeds for single models; gain = naive − post-hoc (positive: post-hoc is better). "
        "Epochs: one value, or the mean (min–max) over runs.",
    ]
    return "\n".join(paragraphs)


def _table_markdown(
    header: Sequence[str], default_name: str, n_configs: int, rows: Sequence[Mapping[str, Any]]
) -> str:
    """``report.md``: ``header`` lines, then a selection table per scope and selection metric."""
    lines = list(header)
    scopes = [("default", f"Default config `{default_name}`", False)]
    if any(row["scope"] == "grid" for row in rows):
        scopes.append(("grid", f"Grid of {n_configs} configs × epochs", True))
    for scope, title, grid in scopes:
        scoped = [row for row in rows if row["scope"] == scope]
        for metric in SELECTION_METRICS:
            lines += [
                "",
                f"## {title}: selected by val {metric}",
                "",
                _selection_table(scoped, metric, grid),
            ]
    lines += ["", "![base vs SWA+TS vs SWA+Ens+TS over epochs](curves.png)"]
    return "\n".join(lines)


def _reversal_markdown(
    name: str,
    curves: Mapping[str, Curves],
    book: CurveBook,
    transforms: Sequence[Composition],
) -> str:
    """Reversal over epochs (default config, curves averaged over seeds) and over configs."""
    lines = [
        f"# Post-hoc reversal report `{name}`",
        "",
        "Over epochs, default config, curves averaged over seeds (ensembles: one curve). For "
        "each transform against the base model: the epochs where each curve is lowest, the "
        "number of epoch pairs whose order the transform reverses (tolerance 0) with the "
        "largest such pair and its size, and the regret: the transform's metric at the base "
        "model's best epoch minus its own minimum (what naive selection gives up). Error in "
        "points, NLL in nats.",
    ]
    for metric in SELECTION_METRICS:
        lines += _epoch_reversal_lines(curves, metric)
    lines += _mismatch_lines(curves)
    if len(book.grid) > 1:
        lines += _config_reversal_lines(book, transforms)
    return "\n".join(lines)


def _epoch_reversal_lines(curves: Mapping[str, Curves], metric: str) -> list[str]:
    """The reversal table over epochs of ``metric`` (default config, curves mean over seeds)."""
    scale = 100.0 if metric == "error" else 1.0
    digits = 2 if metric == "error" else 4
    lines: list[str] = []
    tables = {
        split: {row["transform"]: row for row in reversal_table(curves, metric=metric, split=split)}
        for split, _ in _SPLITS
    }
    head = [
        "transform",
        "val: best epoch base → transform",
        "reversed pairs",
        "largest reversal (epochs: size)",
        "val regret",
        "test: best epochs",
        "test regret",
        "clean test: best epochs",
        "clean test regret",
    ]
    lines += [
        "",
        f"## {metric} over epochs",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---|" * (len(head) - 1),
    ]
    for name_ in curves:
        if name_ == "base":
            continue
        val = tables["val"][name_]
        largest = (
            "–"
            if val["largest_pair"] is None
            else f"{val['largest_pair'][0]} vs {val['largest_pair'][1]}: "
            f"{scale * val['largest_reversal']:.{digits}f}"
        )
        cells = [
            name_,
            f"{val['base_best']} → {val['posthoc_best']}",
            f"{val['n_reversed']} ({100 * val['reversed_fraction']:.1f} %)",
            largest,
            f"{scale * val['regret']:.{digits}f}",
        ]
        for split in ("test", "test_clean"):
            row = tables[split][name_]
            cells += [
                f"{row['base_best']} → {row['posthoc_best']}",
                f"{scale * row['regret']:.{digits}f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mismatch_lines(curves: Mapping[str, Curves]) -> list[str]:
    """The loss–error mismatch table on val: where NLL and error disagree on the best epoch."""
    mismatch = reversal_table(curves, metric="nll", split="val")
    lines = [
        "",
        "## Loss–error mismatch on val",
        "",
        "Per transform: epochs of its lowest val NLL and val error; when the error is lowest "
        "later, how much the NLL rose and the error fell in between, and on how many of the "
        "epoch steps after the NLL minimum the NLL rose while the error fell.",
        "",
        "| transform | NLL best epoch | error best epoch | NLL rise (nats) | error drop (points) "
        "| mismatched steps | mismatch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in mismatch:
        lines.append(
            f"| {row['transform']} | {row['mismatch_nll_best']} | {row['mismatch_error_best']} "
            f"| {row['mismatch_nll_rise']:.4f} | {100 * row['mismatch_error_drop']:.2f} "
            f"| {row['mismatch_mismatched_steps']} / {row['mismatch_steps_after_nll_min']} "
            f"| {'yes' if row['mismatch_mismatch'] else 'no'} |"
        )
    return lines


def _config_reversal_lines(book: CurveBook, transforms: Sequence[Composition]) -> list[str]:
    """The reversal table over configs: each scored by its naive and post-hoc criterion."""
    lines = [
        "",
        "## Over configs",
        "",
        "Each config scored by its naive criterion (mean over seeds of the base model's "
        "best val metric) and by its post-hoc criterion (the same for the transformed "
        "model); reversed pairs of configs, the config each criterion picks, and the "
        "post-hoc regret of the naive pick.",
        "",
        "| transform | metric | reversed pairs | naive best | post-hoc best | regret |",
        "|---|---|---|---|---|---|",
    ]
    for metric in SELECTION_METRICS:
        scale, digits = (100.0, 2) if metric == "error" else (1.0, 4)
        for c in transforms:
            if c.name == "base":
                continue
            row = config_reversal(book, c, metric)
            lines.append(
                f"| {c.name} | val {metric} | {row['n_reversed']} "
                f"({100 * row['reversed_fraction']:.0f} %) | {row['base_best']} "
                f"| {row['posthoc_best']} | {scale * row['regret']:.{digits}f} |"
            )
    return lines


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Every row with every column (union over rows); epochs as space-separated integers."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    key: " ".join(map(str, value)) if isinstance(value, tuple) else value
                    for key, value in row.items()
                }
            )


def _plot(path: Path, curves: Mapping[str, Curves], title: str) -> None:
    """Error and NLL over epochs on val, test and clean test for :data:`PLOTTED`: mean over
    seeds with a ±1 std band (ensembles: one line). NLL panels are cut above the highest
    transformed curve, so the base model's late NLL leaves the panel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [name for name in PLOTTED if name in curves]
    figure, axes = plt.subplots(2, len(_SPLITS), figsize=(5.0 * len(_SPLITS), 7.5))
    for row, metric in enumerate(SELECTION_METRICS):
        scale = 100.0 if metric == "error" else 1.0
        for column, (split, label) in enumerate(_SPLITS):
            axis = axes[row, column]
            for name in shown:
                values = scale * curves[name].values[f"{split}_{metric}"]
                epochs = curves[name].epochs
                mean = values.mean(axis=0)
                (line,) = axis.plot(epochs, mean, label=name)
                if values.shape[0] > 1:
                    spread = values.std(axis=0, ddof=1)
                    axis.fill_between(
                        epochs, mean - spread, mean + spread, color=line.get_color(), alpha=0.2
                    )
            if metric == "nll" and len(shown) > 1:
                means = [curves[n].values[f"{split}_nll"].mean(axis=0) for n in shown]
                low = min(float(m.min()) for m in means)
                high = max(float(m.max()) for m in means[1:])
                axis.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
            axis.set_title(f"{label} {metric}")
            axis.set_xlabel("epoch")
            axis.set_ylabel("error (%)" if metric == "error" else "NLL (nats)")
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
    save_figure(figure, path, title, dpi=110)
