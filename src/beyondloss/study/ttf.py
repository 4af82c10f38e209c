"""The test-time-feedback study: train a grid of (optimizer, learning rate, seed) runs on one task,
then compare optimizers at the learning rate that standard practice would pick.

Standard practice selects each optimizer's learning rate by its one-step validation loss (lowest
mean final-epoch ``val_loss`` over seeds) and the table reports, for that choice, the deployed
(downstream) test metrics. The same grid also gives the learning rate selected by the downstream
validation metric (best mean final ``val_<primary metric>``), reported as a second table.

Layout under ``spec.out``: the results store ``beyondloss.db`` (shared by all studies) and one
folder per study, ``<study name>/``, holding ``runs/<run id>/checkpoint.pt``, ``table.md``,
``table.csv`` and ``curves.png``. A run the store marks complete is skipped on a rerun; an
interrupted one resumes from its checkpoint.

Runs execute in ``spec.workers`` spawned processes with one torch thread each, and every run
builds its task from the same data seed and seeds torch with its own seed, so a run's result
does not depend on which worker ran it or on how many there are.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from beyondloss.optim.factory import OPTIMIZER_NAMES, make_optimizer
from beyondloss.store import ResultsStore
from beyondloss.study.report import (
    Summary,
    format_lr,
    markdown_table,
    plot_curves,
    select_lr,
    summarize,
    write_csv,
)
from beyondloss.tasks import SIZES, TASKS, Task, TaskFactory
from beyondloss.train import Evaluator, TrainConfig, loss_evaluator, train

DATA_SEED = 0
"""Data seed of every run's task: all runs of a study see the same data."""

DEFAULT_OPTIMIZERS = ("adamw", "dopr-adamw", "muon", "dopr-muon")
"""Optimizers compared when a spec names none."""

DEFAULT_LRS = {"quick": (1e-3, 3e-3, 1e-2), "full": (3e-4, 1e-3, 3e-3, 1e-2)}
"""Learning-rate grid per task size when a spec names none (shared by all optimizers)."""

STORE_NAME = "beyondloss.db"
"""File name of the results store inside ``spec.out``."""


@dataclass(frozen=True)
class StudySpec:
    """What to run: every ``(optimizer, lr, seed)`` of the grid on ``task`` at ``size``.

    Attributes
    ----------
    task:
        Registry name (a key of :data:`beyondloss.tasks.TASKS`).
    size:
        Task size, one of :data:`beyondloss.tasks.SIZES`; it sets the data, model, epochs and
        batch size.
    optimizers:
        Optimizer names (see :data:`beyondloss.optim.factory.OPTIMIZER_NAMES`), distinct.
    lrs:
        Learning-rate grid shared by every optimizer, distinct positive values; ``None`` gives
        :data:`DEFAULT_LRS` of ``size``.
    seeds:
        Number of seeds; runs use seeds ``0 .. seeds - 1`` (model initialisation and data order).
    weight_decay:
        Decoupled weight decay of every optimizer, ``>= 0``.
    workers:
        Processes training runs in parallel, one torch thread each.
    out:
        Folder holding the results store and the study folders.
    """

    task: str
    size: str = "quick"
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    lrs: tuple[float, ...] | None = None
    seeds: int = 3
    weight_decay: float = 0.0
    workers: int = 2
    out: Path = field(default=Path("runs"))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(
                f"unknown task {self.task!r}; expected one of {', '.join(sorted(TASKS))}"
            )
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {', '.join(SIZES)}")
        optimizers = tuple(self.optimizers)
        if not optimizers:
            raise ValueError("optimizers must name at least one optimizer")
        unknown = [name for name in optimizers if name not in OPTIMIZER_NAMES]
        if unknown:
            raise ValueError(
                f"unknown optimizers {unknown}; expected some of {', '.join(OPTIMIZER_NAMES)}"
            )
        if len(set(optimizers)) != len(optimizers):
            raise ValueError(f"optimizers must be distinct, got {list(optimizers)}")
        lrs = DEFAULT_LRS[self.size] if self.lrs is None else tuple(float(lr) for lr in self.lrs)
        if not lrs:
            raise ValueError("lrs must hold at least one learning rate")
        if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
            raise ValueError(f"learning rates must be finite and positive, got {list(lrs)}")
        if len({format_lr(lr) for lr in lrs}) != len(lrs):
            raise ValueError(f"learning rates must be distinct, got {list(lrs)}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {self.seeds!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        object.__setattr__(self, "optimizers", optimizers)
        object.__setattr__(self, "lrs", lrs)
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        object.__setattr__(self, "out", Path(self.out))

    @property
    def grid_lrs(self) -> tuple[float, ...]:
        """The learning-rate grid (``lrs`` after defaults)."""
        return self.lrs if self.lrs is not None else DEFAULT_LRS[self.size]

    @property
    def name(self) -> str:
        """Study name, e.g. ``ttf-lorenz-quick`` (``-wd<value>`` appended if weight decay)."""
        suffix = f"-wd{self.weight_decay:g}" if self.weight_decay else ""
        return f"ttf-{self.task}-{self.size}{suffix}"

    @property
    def directory(self) -> Path:
        """The study's folder, ``out/<name>``."""
        return self.out / self.name

    def run_id(self, optimizer: str, lr: float, seed: int) -> str:
        """Run id, e.g. ``lorenz-quick-dopr-adamw-lr0.003-s0`` (``-wd<value>`` before the seed
        if weight decay)."""
        decay = f"-wd{self.weight_decay:g}" if self.weight_decay else ""
        return f"{self.task}-{self.size}-{optimizer}-lr{format_lr(lr)}{decay}-s{seed}"

    def grid(self) -> Iterator[tuple[str, float, int]]:
        """Every ``(optimizer, lr, seed)``, optimizer-major, in spec order."""
        for optimizer in self.optimizers:
            for lr in self.grid_lrs:
                for seed in range(self.seeds):
                    yield optimizer, lr, seed


@dataclass(frozen=True)
class StudyResult:
    """Outcome of :func:`run_study`.

    Attributes
    ----------
    directory:
        The study's folder (``table.md``, ``table.csv``, ``curves.png``, ``runs/``).
    trained, skipped:
        Run ids trained by this call and run ids already complete in the store, in grid order.
    summaries:
        Every configuration's final-epoch metrics over seeds, in grid order.
    by_val_loss:
        Optimizer → its configuration with the lowest mean final ``val_loss``.
    by_downstream:
        Optimizer → its configuration with the best mean final ``val_<primary metric>``.
    markdown:
        The content of ``table.md``.
    wall_seconds:
        Wall time of this call up to writing the report.
    """

    directory: Path
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    summaries: tuple[Summary, ...]
    by_val_loss: Mapping[str, Summary]
    by_downstream: Mapping[str, Summary]
    markdown: str
    wall_seconds: float


@dataclass(frozen=True)
class _Job:
    """Everything a worker process needs to train one run (picklable)."""

    run_id: str
    factory: TaskFactory
    task: str
    size: str
    optimizer: str
    lr: float
    weight_decay: float
    seed: int
    run_dir: Path
    db: Path
    study: str


def run_study(spec: StudySpec, progress: bool = True, command: str | None = None) -> StudyResult:
    """Train the grid of ``spec`` (skipping complete runs) and write the study's report.

    ``progress`` shows a tqdm bar over runs (finished / total, ETA) on stderr. ``command`` is
    the command line recorded in ``table.md``; ``None`` records this call. Raises
    ``RuntimeError`` naming the run if a run fails (runs already finished stay in the store).
    """
    began = time.perf_counter()
    factory = TASKS[spec.task]
    spec.directory.mkdir(parents=True, exist_ok=True)
    db = spec.out / STORE_NAME
    with ResultsStore(db) as store:
        pending, skipped = [], []
        for optimizer, lr, seed in spec.grid():
            run_id = spec.run_id(optimizer, lr, seed)
            if store.is_complete(run_id):
                skipped.append(run_id)
                continue
            pending.append(
                _Job(
                    run_id=run_id,
                    factory=factory,
                    task=spec.task,
                    size=spec.size,
                    optimizer=optimizer,
                    lr=lr,
                    weight_decay=spec.weight_decay,
                    seed=seed,
                    run_dir=spec.directory / "runs" / run_id,
                    db=db,
                    study=spec.name,
                )
            )
        _execute(pending, spec.workers, progress, total=len(pending) + len(skipped))
        curves = {
            (optimizer, lr, seed): store.curves(spec.run_id(optimizer, lr, seed))
            for optimizer, lr, seed in spec.grid()
        }
    task = factory(spec.size, DATA_SEED)
    finals = {
        key: {name: values[-1] for name, values in run.items() if name != "epoch"}
        for key, run in curves.items()
    }
    summaries = summarize(finals)
    primary = f"val_{task.primary_metric}"
    by_val_loss = select_lr(summaries, "val_loss", higher_is_better=False)
    by_downstream = select_lr(
        summaries, primary, higher_is_better=task.higher_is_better[task.primary_metric]
    )
    metrics = _table_metrics(task, finals)
    directions = {"val_loss": False} | {
        f"{split}_{name}": better
        for name, better in task.higher_is_better.items()
        for split in ("val", "test")
    }
    wall_seconds = time.perf_counter() - began
    trained = tuple(job.run_id for job in pending)
    markdown = _markdown(
        spec,
        task,
        command if command is not None else f"beyondloss.study.run_study({spec!r})",
        wall_seconds,
        trained,
        skipped,
        summaries,
        by_val_loss,
        by_downstream,
        metrics,
        directions,
    )
    with _replacing(spec.directory / "table.md") as path:
        path.write_text(markdown + "\n")
    with _replacing(spec.directory / "table.csv") as path:
        write_csv(
            path,
            summaries,
            metrics,
            {"val_loss": by_val_loss, primary: by_downstream},
        )
    with _replacing(spec.directory / "curves.png") as path:
        plot_curves(
            path,
            lambda summary: [
                curves[(summary.optimizer, summary.lr, seed)] for seed in range(spec.seeds)
            ],
            by_val_loss,
            [("val_loss", True), (f"test_{task.primary_metric}", False)],
            f"{spec.name}: each optimizer at its val-loss-selected lr "
            f"(mean ± std over {spec.seeds} seeds)",
        )
    return StudyResult(
        directory=spec.directory,
        trained=trained,
        skipped=tuple(skipped),
        summaries=tuple(summaries),
        by_val_loss=by_val_loss,
        by_downstream=by_downstream,
        markdown=markdown,
        wall_seconds=wall_seconds,
    )


def _execute(jobs: list[_Job], workers: int, progress: bool, total: int) -> None:
    """Train ``jobs`` in a spawned process pool, with a bar over all ``total`` runs."""
    bar = tqdm(total=total, initial=total - len(jobs), unit="run", disable=not progress)
    try:
        if not jobs:
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=context, initializer=_init_worker
        ) as pool:
            futures = {pool.submit(_run_one, job): job.run_id for job in jobs}
            try:
                for future in as_completed(futures):
                    try:
                        future.result()
                    except Exception as error:
                        raise RuntimeError(f"run {futures[future]} failed: {error}") from error
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()


def _init_worker() -> None:
    """One torch thread per worker: runs stay bitwise reproducible and workers don't contend."""
    torch.set_num_threads(1)


def _run_one(job: _Job) -> None:
    """Train one run (in a worker process): register it, train with evaluators, mark complete."""
    task = job.factory(job.size, DATA_SEED)
    splits = task.splits()
    config = TrainConfig(epochs=task.epochs, batch_size=task.batch_size, seed=job.seed)
    torch.manual_seed(job.seed)
    model = task.make_model()
    optimizer = make_optimizer(job.optimizer, model, lr=job.lr, weight_decay=job.weight_decay)
    evaluators = [
        loss_evaluator(task.loss, splits.val, "val_loss"),
        _downstream(task, "val"),
        _downstream(task, "test"),
    ]
    with ResultsStore(job.db) as store:
        store.add_run(
            job.run_id,
            task=job.task,
            optimizer=job.optimizer,
            lr=job.lr,
            weight_decay=job.weight_decay,
            seed=job.seed,
            config={
                "study": job.study,
                "size": job.size,
                "data_seed": DATA_SEED,
                "task_class": task.name,
                "epochs": task.epochs,
                "batch_size": task.batch_size,
            },
        )
        try:
            train(
                model,
                optimizer,
                splits.train,
                task.loss,
                config,
                evaluators,
                run_dir=job.run_dir,
                store=store,
                run_id=job.run_id,
                progress=False,
            )
        except FloatingPointError:
            # The optimizer met non-finite activations: the run diverged. Its last row holds
            # NaN metrics (ranked last by the selection) and a `diverged` flag.
            epoch = len(store.curves(job.run_id)["epoch"]) + 1
            store.log_epoch(job.run_id, epoch, {"val_loss": math.nan, "diverged": 1.0})
            store.mark_complete(job.run_id)


def _downstream(task: Task, split: str) -> Evaluator:
    """Evaluator of ``task``'s downstream metrics on ``split``, prefixed ``<split>_``."""

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        return {f"{split}_{name}": value for name, value in task.evaluate(model, split).items()}

    return evaluate


def _table_metrics(
    task: Task, finals: Mapping[tuple[str, float, int], Mapping[str, float]]
) -> list[str]:
    """``val_loss``, ``val_<primary>``, then every ``test_`` metric (primary first, then the
    task's order, then any others alphabetically)."""
    logged = set().union(*(metrics.keys() for metrics in finals.values()))
    order = [task.primary_metric, *task.higher_is_better]
    order += sorted(name.removeprefix("test_") for name in logged if name.startswith("test_"))
    tests = list(dict.fromkeys(f"test_{name}" for name in order if f"test_{name}" in logged))
    return ["val_loss", f"val_{task.primary_metric}", *tests]


def _markdown(
    spec: StudySpec,
    task: Task,
    command: str,
    wall_seconds: float,
    trained: tuple[str, ...],
    skipped: list[str],
    summaries: list[Summary],
    by_val_loss: Mapping[str, Summary],
    by_downstream: Mapping[str, Summary],
    metrics: list[str],
    directions: Mapping[str, bool],
) -> str:
    primary = f"val_{task.primary_metric}"
    best = "highest" if task.higher_is_better[task.primary_metric] else "lowest"
    lrs = ", ".join(format_lr(lr) for lr in spec.grid_lrs)
    lines = [
        f"# Test-time feedback study `{spec.name}`",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_seconds:.1f} s; runs trained: {len(trained)}, already complete: "
        f"{len(skipped)}; workers: {spec.workers}",
        "",
        f"Task `{spec.task}` ({spec.size}, `{task.name}`): {task.epochs} epochs, batch size "
        f"{task.batch_size}, data seed {DATA_SEED}. Seeds 0–{spec.seeds - 1}; learning rates "
        f"{lrs}; weight decay {spec.weight_decay:g}.",
        f"Values at the final epoch ({task.epochs}): mean ± std over seeds (n seeds); "
        "↑ higher is better, ↓ lower is better.",
        "",
        "## Selected by one-step validation loss",
        "",
        "Each optimizer at the learning rate with the lowest mean final `val_loss`.",
        "",
        markdown_table(list(by_val_loss.values()), metrics, directions),
        "",
        f"## Selected by downstream validation metric `{primary}`",
        "",
        f"Each optimizer at the learning rate with the {best} mean final `{primary}`.",
        "",
        markdown_table(list(by_downstream.values()), metrics, directions),
        "",
        "## All configurations",
        "",
        markdown_table(summaries, metrics, directions),
        "",
        "![val loss and test metric per epoch at the val-loss-selected lr](curves.png)",
    ]
    return "\n".join(lines)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it over ``path`` once written."""
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
