"""The test-time-feedback study: train a grid of (optimizer, learning rate, seed) runs on one task,
then compare optimizers at the learning rate that standard practice would pick.

Standard practice selects each optimizer's learning rate by its one-step validation loss (lowest
mean final-epoch ``val_loss`` over seeds) and the table reports, for that choice, the deployed
(downstream) test metrics. The same grid also gives the learning rate selected by the downstream
validation metric (best mean final ``val_<primary metric>``), reported as a second table. For
every base optimizer X run together with DoPr-X, the report gives the gain of DoPr paired by
seed at each criterion's learning rates, and over all checkpoints the Kendall τ between
``val_loss`` and the downstream metric (how misleading the validation loss is on the task).
:func:`run_all` runs the study on every registered task and gathers the results in one summary.

Layout under ``spec.out``: the results store ``beyondloss.db`` (shared by all studies) and one
folder per study, ``<study name>/``, holding ``runs/<run id>/checkpoint.pt``, ``report.md``,
``table.csv``, ``dopr_vs_base.csv``, ``curves.png`` and ``val_loss_vs_downstream.png``. A run
the store marks complete is skipped on a rerun; an interrupted one resumes from its checkpoint.

DoPr settings (:attr:`StudySpec.dopr`) change only the ``dopr-*`` runs, so only their run ids
(and the study name) carry them; the plain runs keep their ids and are shared by every study of
the same grid, their checkpoints in the folder of the study without DoPr settings.

Runs execute in ``spec.workers`` spawned processes with one torch thread each, and every run
builds its task from the same data seed and seeds torch with its own seed, so a run's result
does not depend on which worker ran it or on how many there are.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beyondloss.distributed import launch
from beyondloss.evaluation import (
    Deployment,
    LogitsEvaluator,
    StepAverageEvaluator,
    WeightAverageEvaluator,
    calibrated,
    calibrated_deployment,
)
from beyondloss.optim.config import APConfig
from beyondloss.optim.diagnostics import AMPLIFICATION_WARNING
from beyondloss.optim.factory import make_optimizer, parse_optimizer
from beyondloss.optim.preconditioner import ActivationPreconditioner
from beyondloss.posthoc.averaging import EMA, SWA, WeightAverage, ema_kind
from beyondloss.posthoc.ensemble import OutputEnsemble
from beyondloss.posthoc.tracker import PosthocTracker
from beyondloss.references import canonical, label
from beyondloss.schedules import check_schedule
from beyondloss.selection.checkpoints import best_epoch_metrics
from beyondloss.selection.configs import (
    Pick,
    Summary,
    best_pick,
    deploy_choices,
    rank_key,
    select_lr,
    summarize,
)
from beyondloss.store import (
    STORE_NAME,
    Artifact,
    ResultsStore,
    RunRecord,
    check_output_folder,
)
from beyondloss.study.executor import Executor, LocalExecutor
from beyondloss.study.html import write_report
from beyondloss.study.report import (
    CI_LABEL,
    GainRow,
    Mismatch,
    dopr_pairs,
    format_cell,
    format_lr,
    gains_table,
    markdown_table,
    mismatch,
    mismatch_table,
    paired_gains,
    plot_curves,
    plot_mismatch,
    replacing,
    write_csv,
    write_gains_csv,
)
from beyondloss.tasks import (
    SIZES,
    TASKS,
    ClassifierTask,
    Task,
    TaskFactory,
    budgeted,
    check_epochs,
    fingerprint,
    selecting,
    suite,
    task_factory,
)
from beyondloss.train import (
    CHECKPOINT_NAME,
    Evaluator,
    TrainConfig,
    checkpoint_contents,
    loss_evaluator,
    train,
)

EXECUTORS = ("local", "ray")
"""Where a study's runs can execute (:attr:`StudySpec.executor`)."""

DATA_SEED = 0
"""Data seed of every run's task: all runs of a study see the same data."""

DEFAULT_OPTIMIZERS = ("adamw", "dopr-adamw", "muon", "dopr-muon")
"""Optimizers compared when a spec names none."""

DEFAULT_LRS = {"quick": (1e-3, 3e-3, 1e-2), "full": (3e-4, 1e-3, 3e-3, 1e-2)}
"""Learning-rate grid per task size when a spec names none (shared by all optimizers)."""

DEFAULT_SEEDS = {"quick": 3, "full": 5}
"""Number of seeds per task size when a spec names none."""

MAX_RUNS = 100_000
"""Most runs one study accepts (optimizers × lrs × seeds); each run is a job, a row and a
folder, so a larger grid is a typo more often than a plan."""

WEIGHT_TRANSFORMS = ("swa", "ema", "epoch-ema")
"""Weight-space transforms, evaluated in each run: SWA of the end-of-epoch weights of the second
half, the per-step EMA (one average per decay of :attr:`StudySpec.ema_decays`, named
``ema<decay>``), and the EMA of the end-of-epoch weights (decay :data:`EPOCH_EMA_DECAY`)."""

RUN_TRANSFORMS = (*WEIGHT_TRANSFORMS, "ts")
"""Transforms evaluated in each run (weight averages and temperature scaling): they change what
a run evaluates, so they tag its run id."""

TRANSFORMS = (*RUN_TRANSFORMS, "ens")
"""Transforms a study evaluates beside the base model (see ``StudySpec``)."""

EPOCH_EMA_DECAY = 0.9
"""Per-epoch decay of the ``"epoch-ema"`` transform (a window of about 10 epochs; no warmup)."""

DEFAULT_EMA_DECAYS = (0.999,)
"""Per-step decays of the ``"ema"`` transform when a spec names none."""

DOPR_SETTINGS = {
    "damping": "damp",
    "damping_mode": "",
    "cov_every": "cov",
    "inverse_every": "inv",
    "ema_decay": "ema",
    "max_block_size": "blk",
    "grafting": "",
    "scope": "",
}
"""Activation-preconditioner settings a study may set, and their tag in run ids (``cov10``;
``damping_mode``, ``grafting`` and ``scope`` are tagged by their value alone, e.g.
``trace``)."""

DOPR_DEFAULTS: Mapping[str, Any] = {name: getattr(APConfig(), name) for name in DOPR_SETTINGS}
"""DoPr's own value of each of :data:`DOPR_SETTINGS`."""

DoprSettings = Mapping[str, float | int | str]
"""``{setting: value}`` over keys of :data:`DOPR_SETTINGS`."""


@dataclass(frozen=True)
class StudySpec:
    """What to run: every ``(optimizer, lr, seed)`` of the grid on ``task`` at ``size``.

    Attributes
    ----------
    task:
        A built-in task's name (a key of :data:`beyondloss.tasks.TASKS`), an installed
        plugin's name (entry-point group ``beyondloss.tasks``), or a reference to a factory
        ``(size, data_seed) -> Task`` of the user's: ``module:factory`` or
        ``path/to/file.py:factory`` (:mod:`beyondloss.references`; a file path is kept
        absolute). Run ids and folders name a plugin or referenced task by :attr:`task_label`,
        which carries its fingerprint, so a changed definition never reuses stale runs.
    size:
        Task size, one of :data:`beyondloss.tasks.SIZES`; it sets the data, model, epochs and
        batch size.
    optimizers:
        Optimizer names (see :data:`beyondloss.optim.factory.OPTIMIZER_NAMES`), plugin names or
        references to a factory ``(model, lr, weight_decay) -> Optimizer``, optionally
        labelled: ``"lion=mypkg.opt:make_lion"`` (:func:`~beyondloss.optim.factory.
        parse_optimizer`); distinct labels. Kept as built-in names and ``label=reference``;
        :attr:`optimizer_labels` are the names in run ids and reports.
    lrs:
        Learning-rate grid shared by every optimizer, distinct positive values; ``None`` gives
        :data:`DEFAULT_LRS` of ``size``.
    seeds:
        Number of seeds; runs use seeds ``0 .. seeds - 1`` (model initialisation and data order).
        ``None`` gives :data:`DEFAULT_SEEDS` of ``size``.
    weight_decay:
        Decoupled weight decay of every optimizer, ``>= 0``.
    dopr:
        Activation-preconditioner settings of the ``dopr-*`` optimizers, keys from
        :data:`DOPR_SETTINGS`, validated by :class:`~beyondloss.optim.config.APConfig`;
        unset keys keep DoPr's defaults. Kept without the
        entries equal to :data:`DOPR_DEFAULTS`, so a default spelled out names the same runs.
        Needs a ``dopr-*`` optimizer.
    transforms:
        Weight-space transforms evaluated every epoch beside the base model, some of
        :data:`TRANSFORMS`: ``"swa"`` (uniform average of the end-of-epoch weights of the second
        half of training), ``"ema"`` and ``"epoch-ema"`` (below). The averaged model is
        rolled out by the task's own ``evaluate`` on val and test (metrics
        ``swa_val_<metric>``, ...). They tag the run ids of every optimizer. ``"ens"``
        (needs two seeds or more) deploys the seeds of each configuration as one model
        (:class:`~beyondloss.posthoc.ensemble.OutputEnsemble`: the mean of their outputs, so a
        policy, dynamics model or velocity field is rolled out on the mean prediction) at the
        final epoch, of the base models (``ens_val_<metric>``, ...) and of each weight average
        (``swa_ens_...``); it is stored as one run per configuration (:meth:`ensemble_id`) and
        does not change the runs' ids. ``"ts"`` (tasks whose models output class logits,
        :class:`~beyondloss.tasks.base.ClassifierTask`) divides the logits of the base model
        and of each weight average by the temperature fitted on its validation logits
        (``ts_...``, ``swa_ts_...``), and with ``"ens"`` adds the post-hoc paper's composition
        TS per member → mean → TS (``ens_ts_...``, ``swa_ens_ts_...``). It tags the run ids.
        ``"ema"`` is the per-step EMA of the weights (folded after every optimizer step, decay
        warmup ``min(d, (1+k)/(10+k))``), one average per decay of ``ema_decays`` (kinds
        ``ema0.999``, ...); ``"epoch-ema"`` averages the end-of-epoch weights with decay
        :data:`EPOCH_EMA_DECAY` per epoch and no warmup.
    ema_decays:
        Decays of the per-step ``"ema"`` transform, distinct, in ``(0, 1)``; several give one
        average each in every run, so the decay is selected on validation like the lr.
    transform_every:
        Evaluate the transforms every ``transform_every`` epochs and at the last (the averages
        are updated every epoch, the per-step EMA every step).
    eval_every:
        Evaluate the base model's downstream metrics (the rollouts) every ``eval_every`` epochs
        and at the last; ``val_loss`` is evaluated every epoch. Between, the store holds no
        downstream value, so Kendall τ over checkpoints uses the evaluated epochs only. Tags the
        run ids of every optimizer (``-eval2``).
    schedule, warmup:
        The learning-rate schedule of every run (:mod:`beyondloss.schedules`: ``"constant"``,
        ``"cosine"`` or ``"linear"`` decay, stepped per optimizer step) and the fraction of its
        steps spent in linear warmup, in ``[0, 1)``. Anything but constant without warmup tags
        the run ids (``-cosine-wu0.05``).
    epochs:
        Training epochs of every run, overriding the task's budget at ``size`` (``None``: the
        task's own); tags the run ids (``-ep50``).
    metric:
        The downstream metric the study selects and reports by; ``None`` is the task's primary
        metric. Another (e.g. ``nll`` of a classifier, the metric temperature scaling changes)
        makes every run evaluate all metrics on val (:class:`~beyondloss.tasks.SelectedMetric`)
        and tags the run ids (``-by-nll``).
    workers:
        Runs trained in parallel, one torch thread each: processes of the local pool, or the
        CPUs of a Ray instance started for the study.
    out:
        Folder holding the results store and the study folders.
    executor:
        Where runs execute, one of :data:`EXECUTORS`: ``"local"`` (spawned processes) or
        ``"ray"`` (Ray tasks, :class:`~beyondloss.study.ray_executor.RayExecutor`; needs the
        ``ray`` extra). The results do not depend on it.
    address:
        With ``executor="ray"``, the cluster to join (``"auto"``, ``"host:port"``); ``None``
        starts a local Ray instance with ``workers`` CPUs.
    storage:
        Folder for the run folders (checkpoints, evaluator states), which every worker must
        see: on a cluster, a shared file system. ``None`` keeps them under ``out``. The store
        and the reports stay in ``out``, on the machine of the process running the study, its
        one writer; registered checkpoints outside ``out`` are recorded by absolute path.
    ddp:
        Processes per run: ``ddp > 1`` trains each run data-parallel on that many ranks
        (:func:`beyondloss.distributed.launch`; each global batch split over the ranks, see
        :mod:`beyondloss.train`), restarted from its checkpoint when a rank dies. A run's
        numbers then match its one-process numbers up to the order of floating-point sums;
        its id does not change, and a checkpoint resumes only on the ranks that wrote it.
    """

    task: str
    size: str = "quick"
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    lrs: tuple[float, ...] | None = None
    seeds: int | None = None
    weight_decay: float = 0.0
    dopr: DoprSettings = field(default_factory=dict, hash=False)
    transforms: tuple[str, ...] = ()
    ema_decays: tuple[float, ...] = DEFAULT_EMA_DECAYS
    transform_every: int = 1
    eval_every: int = 1
    schedule: str = "constant"
    warmup: float = 0.0
    epochs: int | None = None
    metric: str | None = None
    workers: int = 2
    out: Path = field(default=Path("runs"))
    executor: str = "local"
    address: str | None = None
    storage: Path | None = None
    ddp: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", canonical(self.task))
        factory = task_factory(self.task)  # ValueError, in one line, if it does not resolve
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {', '.join(SIZES)}")
        optimizers = _check_optimizers(self.optimizers)
        lrs = (
            DEFAULT_LRS[self.size] if self.lrs is None else grid_values("learning rates", self.lrs)
        )
        seeds = DEFAULT_SEEDS[self.size] if self.seeds is None else self.seeds
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        dopr = _check_dopr(self.dopr)
        if dopr and not any(_is_dopr(name) for name in optimizers):
            raise ValueError(
                f"dopr settings {dict(dopr)} apply to dopr-* optimizers only; none among "
                f"{list(optimizers)}"
            )
        transforms = tuple(self.transforms)
        if len(set(transforms)) != len(transforms) or not set(transforms) <= set(TRANSFORMS):
            raise ValueError(
                f"transforms must be distinct names among {', '.join(TRANSFORMS)}, "
                f"got {list(transforms)}"
            )
        check_grid_size(len(optimizers) * len(lrs) * seeds)
        if "ens" in transforms and seeds < 2:
            raise ValueError(f"the 'ens' transform needs seeds >= 2, got {seeds}")
        ema_decays = _check_protocol(self, transforms)
        # Only "ts" and a metric need the task itself (building some tasks imports MuJoCo).
        task = factory(self.size, DATA_SEED) if "ts" in transforms or self.metric else None
        if "ts" in transforms and not isinstance(task, ClassifierTask):
            raise ValueError(
                f"the 'ts' transform needs a task whose model outputs class logits "
                f"({', '.join(n for n, f in TASKS.items() if _is_classifier(f))}); "
                f"{self.task} has none"
            )
        metric = None if task is None or self.metric == task.primary_metric else self.metric
        if task is not None and metric is not None and metric not in task.higher_is_better:
            raise ValueError(
                f"task {self.task} has no metric {metric!r}; it has "
                f"{', '.join(task.higher_is_better)}"
            )
        for name in ("transform_every", "eval_every", "workers", "ddp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"unknown executor {self.executor!r}; expected one of {', '.join(EXECUTORS)}"
            )
        if self.address is not None and self.executor != "ray":
            raise ValueError("address applies to executor 'ray' only")
        object.__setattr__(self, "optimizers", optimizers)
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "ema_decays", ema_decays)
        object.__setattr__(self, "warmup", float(self.warmup))
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "lrs", lrs)
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        object.__setattr__(self, "dopr", dopr)
        object.__setattr__(self, "out", Path(self.out))
        if self.storage is not None:
            object.__setattr__(self, "storage", Path(self.storage))
        if self.task not in TASKS:
            _ = self.task_fingerprint  # builds the task: check_task fails here, in one line

    @property
    def grid_lrs(self) -> tuple[float, ...]:
        """The learning-rate grid (``lrs`` after defaults)."""
        return self.lrs if self.lrs is not None else DEFAULT_LRS[self.size]

    @property
    def grid_seeds(self) -> int:
        """The number of seeds (``seeds`` after defaults)."""
        return self.seeds if self.seeds is not None else DEFAULT_SEEDS[self.size]

    @property
    def suffix(self) -> str:
        """What the study name adds after ``ttf-<task>-<size>``: ``-wd<value>`` if weight decay,
        the base-evaluation cadence (``-eval2``), the transforms (``-swa+ema``, ``-every2``),
        the tags of the DoPr settings (``-cov10-inv10-ema0.9``), then ``-ens`` for seed
        ensembles; empty for none. ``-ens`` names the report only: the ensembles add no runs, so
        the runs stay in the folder of the study without it (:meth:`study_of`)."""
        return self._base_tag + self._dopr_tag + ("-ens" if self.ensembles else "")

    @property
    def name(self) -> str:
        """Study name, e.g. ``ttf-lorenz-quick`` or ``ttf-lorenz-quick-wd0.01-cov10`` (see
        :attr:`suffix`)."""
        return f"ttf-{self.task_label}-{self.size}{self.suffix}"

    @property
    def optimizer_labels(self) -> tuple[str, ...]:
        """The optimizers' names in run ids and reports: a built-in's own name, a user
        optimizer's label (``label=reference``)."""
        return tuple(item.partition("=")[0] for item in self.optimizers)

    def optimizer_reference(self, optimizer: str) -> str:
        """The reference of the user optimizer labelled ``optimizer``; empty for a built-in."""
        items = {item.partition("=")[0]: item.partition("=")[2] for item in self.optimizers}
        return items[optimizer]

    @cached_property
    def task_label(self) -> str:
        """The task's name in run ids, folders and the store: a built-in task's own name; for a
        plugin or a reference, its name (the factory's) and the first 8 hex digits of the
        task's :func:`~beyondloss.tasks.fingerprint` (``make_task-1f0c9a2e``)."""
        if self.task in TASKS:
            return self.task
        return f"{label(self.task)}-{self.task_fingerprint[:8]}"

    @cached_property
    def task_fingerprint(self) -> str:
        """:func:`~beyondloss.tasks.fingerprint` of the task as the runs train it (its
        ``--epochs`` budget included); runs record it, and a complete run that recorded another
        is refused rather than reused (:func:`pending_runs`)."""
        return fingerprint(self.make_task())

    @property
    def directory(self) -> Path:
        """The study's folder, ``out/<name>``."""
        return self.out / self.name

    def make_task(self) -> Task:
        """The study's task (data seed :data:`DATA_SEED`), judged by :attr:`metric`, trained
        for :attr:`epochs` if set."""
        return self.factory(self.size, DATA_SEED)

    @property
    def factory(self) -> TaskFactory:
        """The factory of :attr:`task` (:func:`~beyondloss.tasks.task_factory`), wrapped to
        train for :attr:`epochs` and to judge by :attr:`metric` if set (picklable)."""
        factory = task_factory(self.task)
        if self.epochs is not None:
            factory = partial(budgeted, factory, self.epochs)
        return factory if self.metric is None else partial(selecting, factory, self.metric)

    def study_of(self, optimizer: str) -> str:
        """Name of the study owning ``optimizer``'s runs: :attr:`name` without ``-ens``, and
        for a plain optimizer also without DoPr tags (the DoPr settings do not change its runs)."""
        tags = self._base_tag + (self._dopr_tag if _is_dopr(optimizer) else "")
        return f"ttf-{self.task_label}-{self.size}{tags}"

    def run_id(self, optimizer: str, lr: float, seed: int) -> str:
        """Run id, e.g. ``lorenz-quick-dopr-adamw-lr0.003-s0``: ``-wd<value>`` before the seed
        if weight decay, the transforms' tag, then for ``dopr-*`` optimizers the DoPr tags
        (``-cov10``)."""
        tags = self._base_tag + (self._dopr_tag if _is_dopr(optimizer) else "")
        return run_id(self.task_label, self.size, optimizer, lr, seed, tags)

    def ensemble_id(self, optimizer: str, lr: float) -> str:
        """Run id of the seed ensemble of one configuration: :meth:`run_id` with ``-ens`` in
        place of the seed, e.g. ``lorenz-quick-adamw-lr0.003-ens``."""
        return self.run_id(optimizer, lr, 0).removesuffix("-s0") + "-ens"

    @property
    def weight_transforms(self) -> tuple[str, ...]:
        """The weight averages each run keeps, in spec order: ``swa``, ``epoch-ema``, and
        ``"ema"`` expanded into one ``ema<decay>`` per decay of :attr:`ema_decays`."""
        names: list[str] = []
        for name in self.transforms:
            if name == "ema":
                names += [ema_kind(decay) for decay in self.ema_decays]
            elif name in WEIGHT_TRANSFORMS:
                names.append(name)
        return tuple(names)

    @property
    def run_transforms(self) -> tuple[str, ...]:
        """The transforms each run evaluates: :attr:`weight_transforms`, then ``"ts"``."""
        return self.weight_transforms + (("ts",) if "ts" in self.transforms else ())

    @property
    def ensembles(self) -> tuple[str, ...]:
        """Names of the ensemble transforms evaluated: ``ens`` and ``<average>_ens`` per weight
        average, then with ``"ts"`` the same with ``_ts`` (members scaled, then the mean);
        empty without ``"ens"``."""
        if "ens" not in self.transforms:
            return ()
        plain = ("ens", *(f"{name}_ens" for name in self.weight_transforms))
        return plain + (tuple(f"{name}_ts" for name in plain) if "ts" in self.transforms else ())

    @property
    def evaluated(self) -> tuple[str, ...]:
        """Every transform whose metrics the study reads: weight averages, then with ``"ts"``
        the scaled base model and averages (``ts``, ``swa_ts``, ...), then ensembles."""
        scaled = ("ts", *(f"{name}_ts" for name in self.weight_transforms))
        return (
            self.weight_transforms
            + (scaled if "ts" in self.transforms else ())
            + self.ensembles
        )

    def grid(self) -> Iterator[tuple[str, float, int]]:
        """Every ``(optimizer, lr, seed)``, optimizer-major, in spec order."""
        for optimizer in self.optimizer_labels:
            for lr in self.grid_lrs:
                for seed in range(self.grid_seeds):
                    yield optimizer, lr, seed

    @property
    def _base_tag(self) -> str:
        """Tags of the settings that change every optimizer's runs: weight decay, budget,
        schedule, evaluation cadence, transforms, metric."""
        tag = f"-wd{self.weight_decay:g}" if self.weight_decay else ""
        tag += f"-ep{self.epochs}" if self.epochs is not None else ""
        if self.schedule != "constant" or self.warmup:
            tag += f"-{self.schedule}" + (f"-wu{self.warmup:g}" if self.warmup else "")
        tag += f"-eval{self.eval_every}" if self.eval_every != 1 else ""
        if self.run_transforms:
            tag += "-" + "+".join(self.run_transforms)
            tag += f"-every{self.transform_every}" if self.transform_every != 1 else ""
        return tag + (f"-by-{self.metric}" if self.metric is not None else "")

    @property
    def _dopr_tag(self) -> str:
        return "".join(
            f"-{DOPR_SETTINGS[key]}{value:g}" if not isinstance(value, str) else f"-{value}"
            for key, value in self.dopr.items()
        )


def run_id(task: str, size: str, optimizer: str, lr: float, seed: int, tags: str = "") -> str:
    """The one run-id scheme of every study: ``<task>-<size>-<optimizer>-lr<lr><tags>-s<seed>``,
    where ``tags`` names whatever else changes the run (``-wd0.01``, ``-swa``, ``-cov10``)."""
    return f"{task}-{size}-{optimizer}-lr{format_lr(lr)}{tags}-s{seed}"


def _check_optimizers(items: Sequence[str]) -> tuple[str, ...]:
    """``items`` (built-in names, plugin names or references, see
    :func:`~beyondloss.optim.factory.parse_optimizer`) as a spec keeps them: built-in names
    as they are, every other as ``label=reference``; ``ValueError`` for none, an unresolved
    reference, or two optimizers under one label."""
    parsed = [parse_optimizer(item) for item in items]
    if not parsed:
        raise ValueError("optimizers must name at least one optimizer")
    labels = [name for name, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"optimizers must be distinct, got {labels}")
    return tuple(name if name == reference else f"{name}={reference}" for name, reference in parsed)


def check_grid_size(runs: int, axes: str = "optimizers × lrs × seeds") -> None:
    """Refuse a study of more than :data:`MAX_RUNS` runs before anything is built for it
    (``--seeds 1000000000`` would otherwise fill memory with jobs before the first run)."""
    if runs > MAX_RUNS:
        raise ValueError(
            f"the grid has {runs:,} runs ({axes}), more than the {MAX_RUNS:,} "
            "a study accepts; split it into several studies over one store"
        )


def grid_values(label: str, values: Sequence[float], allow_zero: bool = False) -> tuple[float, ...]:
    """``values`` of one grid axis as floats; ``ValueError`` naming ``label`` unless there is at
    least one, all are finite and ``> 0`` (``>= 0`` with ``allow_zero``) and no two print alike
    in a run id."""
    out = tuple(float(v) for v in values)
    if not out:
        raise ValueError(f"{label} must hold at least one value")
    if not all(math.isfinite(v) and (v >= 0 if allow_zero else v > 0) for v in out):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{label} must be finite and {bound}, got {list(out)}")
    if len({format_lr(v) for v in out}) != len(out):
        raise ValueError(f"{label} must be distinct, got {list(out)}")
    return out


def _check_protocol(spec: StudySpec, transforms: tuple[str, ...]) -> tuple[float, ...]:
    """Validate ``spec``'s training protocol (EMA decays, schedule, warmup, epochs); the EMA
    decays as floats."""
    ema_decays = tuple(float(d) for d in spec.ema_decays)
    if not ema_decays or not all(0.0 < d < 1.0 for d in ema_decays):
        raise ValueError(f"ema_decays must lie in (0, 1), got {list(spec.ema_decays)}")
    if len({ema_kind(d) for d in ema_decays}) != len(ema_decays):
        raise ValueError(f"ema_decays must be distinct, got {list(spec.ema_decays)}")
    if ema_decays != DEFAULT_EMA_DECAYS and "ema" not in transforms:
        raise ValueError("ema_decays apply to the 'ema' transform; add it to transforms")
    check_schedule(spec.schedule, spec.warmup)
    if spec.epochs is not None:
        check_epochs(spec.epochs)
    return ema_decays


def _is_classifier(factory: TaskFactory) -> bool:
    """Whether ``factory``'s tasks output class logits (:class:`ClassifierTask`)."""
    return isinstance(factory("quick", DATA_SEED), ClassifierTask)


def _is_dopr(optimizer: str) -> bool:
    return optimizer.startswith("dopr-")


def _check_dopr(settings: DoprSettings) -> dict[str, float | int | str]:
    """Validated ``settings`` in :data:`DOPR_SETTINGS` order, without DoPr's default values.

    Validation is :class:`~beyondloss.optim.config.APConfig`'s own.
    """
    unknown = sorted(set(settings) - set(DOPR_SETTINGS))
    if unknown:
        raise ValueError(
            f"unknown dopr settings {unknown}; expected some of {', '.join(DOPR_SETTINGS)}"
        )
    try:
        config = APConfig.from_mapping(settings)
    except ValueError as error:
        raise ValueError(f"dopr {error}") from None
    return {
        key: getattr(config, key)
        for key in DOPR_SETTINGS
        if key in settings and getattr(config, key) != DOPR_DEFAULTS[key]
    }


@dataclass(frozen=True)
class StudyResult:
    """Outcome of :func:`run_study`.

    Attributes
    ----------
    directory:
        The study's folder (``report.md``, ``table.csv``, ``dopr_vs_base.csv``, ``curves.png``,
        ``val_loss_vs_downstream.png``).
    trained, skipped:
        Run ids trained by this call and run ids already complete in the store, in grid order.
    summaries:
        Every configuration's final-epoch metrics over seeds, in grid order.
    by_val_loss:
        Optimizer → its configuration with the lowest mean final ``val_loss``.
    by_downstream:
        Optimizer → its configuration with the best mean final ``val_<primary metric>``.
    gains:
        DoPr-X against X paired by seed, at the lrs selected by ``val_loss`` and by
        ``val_<primary>``, on ``test_<primary>`` and ``val_loss``.
    mismatch:
        Kendall τ of ``val_loss`` against ``val_<primary>`` and ``test_<primary>``.
    tables:
        The markdown tables of ``report.md`` by name: ``"val_loss"``, ``"downstream"``,
        ``"dopr_vs_base"``, ``"kendall"``, ``"all"``.
    markdown:
        The content of ``report.md``.
    wall_seconds:
        Wall time of this call up to writing the report.
    """

    directory: Path
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    summaries: tuple[Summary, ...]
    by_val_loss: Mapping[str, Summary]
    by_downstream: Mapping[str, Summary]
    gains: tuple[GainRow, ...]
    mismatch: tuple[Mismatch, ...]
    tables: Mapping[str, str]
    markdown: str
    wall_seconds: float


@dataclass(frozen=True)
class RunJob:
    """Everything a worker process needs to train one run (picklable)."""

    run_id: str
    factory: TaskFactory
    task: str
    size: str
    optimizer: str
    lr: float
    weight_decay: float
    dopr: dict[str, float | int | str]
    seed: int
    run_dir: Path
    db: Path
    study: str
    transforms: tuple[str, ...] = ()
    """The run's transforms (:attr:`StudySpec.run_transforms`: weight averages, ``ts``)."""
    schedule: str = "constant"
    warmup: float = 0.0
    transform_every: int = 1
    eval_every: int = 1
    data_seed: int = DATA_SEED
    ddp: int = 1
    """Processes that train the run (data-parallel when more than one)."""
    fingerprint: str = ""
    """The task's fingerprint as the study computed it (:attr:`StudySpec.task_fingerprint`);
    a complete run that recorded another is refused by :func:`pending_runs`. Empty: unchecked."""
    task_reference: str = ""
    """The reference a plugin or user task was resolved from (recorded in the run's config);
    empty for a built-in task."""
    optimizer_reference: str = ""
    """The reference of a user optimizer (:attr:`optimizer` is then its label); empty for a
    built-in optimizer."""
    track_logits: bool = False
    """Evaluate with a :class:`~beyondloss.evaluation.LogitsEvaluator` instead of the study's
    evaluators (classification tasks: the post-hoc study's per-epoch logits of the base model
    and its SWA from epoch 1, kept in the run's checkpoint)."""


def run_study(spec: StudySpec, progress: bool = True, command: str | None = None) -> StudyResult:
    """Train the grid of ``spec`` (skipping complete runs) and write the study's report.

    ``progress`` shows a tqdm bar over runs (finished / total, ETA) on stderr. ``command`` is
    the command line recorded in ``report.md``; ``None`` records this call. Raises
    ``RuntimeError`` naming the run if a run fails (runs already finished stay in the store).
    """
    began = time.perf_counter()
    check_output_folder(spec.out)
    spec.directory.mkdir(parents=True, exist_ok=True)
    trained, skipped = _train_grid(spec, progress)
    with ResultsStore(spec.out / STORE_NAME, readonly=True) as store:
        curves = {key: store.curves(spec.run_id(*key)) for key in spec.grid()}
        ensembles = {
            (optimizer, lr): store.curves(spec.ensemble_id(optimizer, lr))
            for optimizer, lr in grid_configs(spec)
            if spec.ensembles
        }
    task = spec.make_task()
    higher = task.higher_is_better[task.primary_metric]
    finals = {key: run_finals(spec, task, run) for key, run in curves.items()}
    summaries = with_ensembles(summarize(finals), ensembles)
    primary = f"val_{task.primary_metric}"
    test_primary = f"test_{task.primary_metric}"
    by_val_loss = select_lr(summaries, "val_loss", higher_is_better=False)
    by_downstream = select_lr(summaries, primary, higher_is_better=higher)
    selections = {"val_loss": by_val_loss, primary: by_downstream}
    metrics = _table_metrics(task, finals)
    directions = _directions(spec, task)
    gains = paired_gains(finals, selections, [test_primary, "val_loss"], directions)
    agreement = [mismatch(curves, name, higher) for name in (primary, test_primary)]
    tables = {
        "transforms": _transforms_table(spec, summaries, by_val_loss, task, directions),
        "diagnostics": _diagnostics_table(by_val_loss, test_primary),
        "deploy": _deploy_table(spec, summaries, task),
        "checkpoints": _checkpoint_table(spec, summaries, task),
        "val_loss": markdown_table(list(by_val_loss.values()), metrics, directions),
        "downstream": markdown_table(list(by_downstream.values()), metrics, directions),
        "dopr_vs_base": gains_table(gains, [test_primary, "val_loss"], directions),
        "kendall": mismatch_table(agreement),
        "all": markdown_table(summaries, metrics, directions),
    }
    wall_seconds = time.perf_counter() - began
    markdown = _markdown(
        spec,
        task,
        command if command is not None else f"beyondloss.study.run_study({spec!r})",
        wall_seconds,
        trained,
        skipped,
        tables,
    )
    with replacing(spec.directory / "table.csv") as path:
        write_csv(path, summaries, metrics, selections)
    with replacing(spec.directory / "dopr_vs_base.csv") as path:
        write_gains_csv(path, gains, directions)
    _plot_study(spec, curves, by_val_loss, agreement[0], task)
    write_report(spec.directory, markdown, spec.name)
    return StudyResult(
        directory=spec.directory,
        trained=trained,
        skipped=skipped,
        summaries=tuple(summaries),
        by_val_loss=by_val_loss,
        by_downstream=by_downstream,
        gains=tuple(gains),
        mismatch=tuple(agreement),
        tables=tables,
        markdown=markdown,
        wall_seconds=wall_seconds,
    )


def run_finals(
    spec: StudySpec, task: Task, curves: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """One run's values as the study selects among them: every metric at the final epoch, and
    the base model's and each weight average's epoch chosen by its own val metric
    (``...@best``, ``...@oracle``: :func:`~beyondloss.selection.checkpoints.best_epoch_metrics`)."""
    metric = task.primary_metric
    prefixes = ("", *(f"{name}_" for name in spec.weight_transforms))
    finals = {name: values[-1] for name, values in curves.items() if name != "epoch"}
    return finals | best_epoch_metrics(curves, prefixes, metric, task.higher_is_better[metric])


def _directions(spec: StudySpec, task: Task) -> dict[str, bool]:
    """Whether higher is better for every metric the study reports: ``val_loss``, the task's
    metrics on val and test, and the same under each transform's prefix."""
    directions = {"val_loss": False} | {
        f"{split}_{name}": better
        for name, better in task.higher_is_better.items()
        for split in ("val", "test")
    }
    return directions | {
        f"{name}_{metric}": better
        for name in spec.evaluated
        for metric, better in directions.items()
        if metric != "val_loss"
    }


def _plot_study(
    spec: StudySpec,
    curves: Mapping[tuple[str, float, int], Mapping[str, list[float]]],
    by_val_loss: Mapping[str, Summary],
    agreement: Mismatch,
    task: Task,
) -> None:
    """``curves.png`` (val loss and test metric per epoch at the val-loss-selected lrs) and
    ``val_loss_vs_downstream.png`` (every checkpoint) in the study folder."""
    primary = f"val_{task.primary_metric}"
    with replacing(spec.directory / "curves.png") as path:
        plot_curves(
            path,
            lambda summary: [
                curves[(summary.optimizer, summary.lr, seed)] for seed in range(spec.grid_seeds)
            ],
            by_val_loss,
            [("val_loss", True), (f"test_{task.primary_metric}", False)],
            f"{spec.name}: each optimizer at its val-loss-selected lr "
            f"(mean; band: lowest to highest of {spec.grid_seeds} seeds)",
        )
    with replacing(spec.directory / "val_loss_vs_downstream.png") as path:
        plot_mismatch(
            path,
            curves,
            primary,
            f"{spec.name}: {agreement.checkpoints.n} checkpoints, Kendall τ = "
            f"{agreement.checkpoints.tau:+.2f}\n(+1: lower val_loss ⇔ better {primary})",
        )


@dataclass(frozen=True)
class SuiteResult:
    """Outcome of :func:`run_all`.

    Attributes
    ----------
    directory:
        ``out/ttf-all-<size><suffix>``, holding ``summary.md``.
    results:
        Task → its :class:`StudyResult`, for the tasks whose study finished, in registry order.
    failures:
        Task → the traceback of the error that stopped its study.
    markdown:
        The content of ``summary.md``.
    wall_seconds:
        Wall time of the whole call.
    """

    directory: Path
    results: Mapping[str, StudyResult]
    failures: Mapping[str, str]
    markdown: str
    wall_seconds: float


def run_all(
    size: str = "quick",
    progress: bool = True,
    command: str | None = None,
    tasks: Sequence[str] | None = None,
    **study: Any,
) -> SuiteResult:
    """Run the study of each of ``tasks`` in turn (``None``: the suite of ``size``,
    :func:`beyondloss.tasks.suite`: one task per family at quick size, every task at full).

    ``study`` holds the other :class:`StudySpec` fields (``optimizers``, ``lrs``, ``seeds``,
    ``weight_decay``, ``dopr``, ``workers``, ``out``), shared by all tasks. Every spec is
    validated before any run starts. A task whose study raises is recorded in ``failures``
    and the next task runs; ``summary.md`` gathers per task the val-loss-selected table, the
    DoPr-vs-base table and the Kendall τ table, with ``command`` (``None`` records this call)
    and the total wall time.
    """
    began = time.perf_counter()
    names = suite(size) if tasks is None else tuple(tasks)
    specs = [StudySpec(task=name, size=size, **study) for name in names]
    if not specs:
        raise ValueError("no task to study")
    directory = specs[0].out / f"ttf-all-{size}{specs[0].suffix}"
    results: dict[str, StudyResult] = {}
    failures: dict[str, str] = {}
    for spec in specs:
        try:
            results[spec.task] = run_study(spec, progress=progress, command=command)
        except Exception as error:
            failures[spec.task] = "".join(traceback.format_exception(error))
    wall_seconds = time.perf_counter() - began
    call = f"beyondloss.study.ttf.run_all(size={size!r}, **{study!r})"
    markdown = _summary_markdown(
        specs, results, failures, command if command is not None else call, wall_seconds
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_report(directory, markdown, directory.name, name="summary")
    return SuiteResult(directory, results, failures, markdown, wall_seconds)


def grid_configs(spec: StudySpec) -> list[tuple[str, float]]:
    """Every ``(optimizer, lr)`` of the grid, in grid order."""
    return list(dict.fromkeys((optimizer, lr) for optimizer, lr, _ in spec.grid()))


def run_job(spec: StudySpec, optimizer: str, lr: float, seed: int) -> RunJob:
    """The job that trains (or trained) run ``(optimizer, lr, seed)`` of ``spec``."""
    run_id = spec.run_id(optimizer, lr, seed)
    return RunJob(
        run_id=run_id,
        factory=spec.factory,
        task=spec.task_label,
        size=spec.size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=spec.weight_decay,
        dopr=dict(spec.dopr) if _is_dopr(optimizer) else {},
        seed=seed,
        run_dir=(spec.storage or spec.out) / spec.study_of(optimizer) / "runs" / run_id,
        db=spec.out / STORE_NAME,
        study=spec.study_of(optimizer),
        transforms=spec.run_transforms,
        schedule=spec.schedule,
        warmup=spec.warmup,
        transform_every=spec.transform_every,
        eval_every=spec.eval_every,
        ddp=spec.ddp,
        fingerprint=spec.task_fingerprint,
        task_reference="" if spec.task in TASKS else spec.task,
        optimizer_reference=spec.optimizer_reference(optimizer),
    )


def _train_grid(spec: StudySpec, progress: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Train the runs of ``spec`` that the store does not mark complete, then evaluate the
    seed ensembles not yet stored, in the executor; the run ids trained and skipped."""
    jobs = [run_job(spec, *key) for key in spec.grid()]
    pending = pending_runs(jobs)
    with ResultsStore(spec.out / STORE_NAME) as store:
        ensembles = [
            _EnsembleJob(
                run_id=spec.ensemble_id(optimizer, lr),
                members=tuple(job for job in jobs if (job.optimizer, job.lr) == (optimizer, lr)),
            )
            for optimizer, lr in grid_configs(spec)
            if spec.ensembles and not store.is_complete(spec.ensemble_id(optimizer, lr))
        ]
    with _executor(spec, len(pending) + len(ensembles)) as executor:
        done = train_runs(executor, jobs, pending, spec.name, progress)
        if ensembles:
            with ResultsStore(spec.out / STORE_NAME) as store:
                calls = [(_ensemble_one, job, _checkpoints(store, job)) for job in ensembles]
                executor.run(
                    calls,
                    [f"ensemble {job.run_id}" for job in ensembles],
                    f"{spec.name} ensembles",
                    progress,
                    on_result=lambda _, record: store.record(record),
                )
    return done


def _executor(spec: StudySpec, calls: int) -> Any:
    """The executor of ``spec`` for ``calls`` calls (a local pool no larger than needed)."""
    if spec.executor == "ray":
        from beyondloss.study.ray_executor import RayExecutor

        return RayExecutor(address=spec.address, cpus_per_run=spec.ddp, num_cpus=spec.workers)
    return LocalExecutor(min(spec.workers, calls))


def pending_runs(jobs: Sequence[RunJob]) -> list[RunJob]:
    """The jobs whose run the store does not mark complete: the one "done" rule of every study
    (a run is complete once its last epoch is logged, or once it diverged)."""
    if not jobs:
        return []
    with ResultsStore(jobs[0].db) as store:
        complete = {run["run_id"]: run["config"] for run in store.runs(status="complete")}
    for job in jobs:
        recorded = complete.get(job.run_id, {}).get("task_fingerprint", job.fingerprint)
        if job.fingerprint and recorded != job.fingerprint:
            raise ValueError(
                f"run {job.run_id} in {job.db} was trained on another definition of task "
                f"{job.task} (fingerprint {recorded[:8]}, now {job.fingerprint[:8]}): study the "
                "changed task in another --out, or remove the old runs"
            )
    return [job for job in jobs if job.run_id not in complete]


def train_runs(
    executor: Executor,
    jobs: Sequence[RunJob],
    pending: Sequence[RunJob],
    label: str,
    progress: bool,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Train ``pending`` (a subset of ``jobs``, see :func:`pending_runs`) in ``executor``
    under a bar over all ``jobs``; the run ids trained and those skipped as complete. This
    process writes each run to the store as its worker returns it (:func:`_run_one`), in one
    transaction: the store has one writer, and a study killed at any point loses only the runs
    in flight, which resume from their checkpoints when it is restarted."""
    if pending:
        with ResultsStore(pending[0].db) as store:
            executor.run(
                [(_run_one, job) for job in pending],
                [f"run {job.run_id}" for job in pending],
                label,
                progress,
                total=len(jobs),
                on_result=lambda _, record: store.record(record),
            )
    skipped = tuple(job.run_id for job in jobs if job not in pending)
    return tuple(job.run_id for job in pending), skipped


@dataclass(frozen=True)
class _EnsembleJob:
    """The seed ensemble of one configuration: its run id and the jobs of its members."""

    run_id: str
    members: tuple[RunJob, ...]


def _evaluators(task: Task, job: RunJob) -> list[Evaluator]:
    """What a run evaluates after every epoch: val loss, downstream val and test metrics, then
    its weight averages (checkpointable, in ``job.transforms`` order). A job that tracks logits
    has its :class:`LogitsEvaluator` alone."""
    if job.track_logits:
        data = task.data()  # type: ignore[attr-defined]
        return [LogitsEvaluator(PosthocTracker(data.val, data.test, swa_start=1))]
    splits = task.splits()
    evaluators = [
        loss_evaluator(task.loss, splits.val, "val_loss"),
        _downstream(task, "val", job.eval_every),
        _downstream(task, "test", job.eval_every),
    ]
    return evaluators + _transform_evaluators(task, job)


def rebuild(job: RunJob, kind: str = "base", checkpoint: Path | None = None) -> nn.Module:
    """The final model of ``job``'s run from its checkpoint: ``"base"``, the weight average
    ``kind`` (``"swa"``, ``"ema0.999"``, ..., one of ``job.transforms``) as it was when the run
    evaluated it last, or either scaled by its fitted temperature (``"ts"``, ``"swa_ts"``; the
    fit is deterministic, so the temperature is the one the run found). ``checkpoint`` is the
    file to load; ``None`` looks it up in the store (:func:`checkpoint_of`).

    Raises ``FileNotFoundError`` without a checkpoint and ``ValueError`` for an unknown kind.
    """
    task = job.factory(job.size, job.data_seed)
    kinds = _run_kinds(job.transforms)
    if kind not in kinds:
        raise ValueError(f"run {job.run_id} has no {kind!r}; it has {', '.join(kinds)}")
    if kind == "ts" or kind.endswith("_ts"):
        source = kind.removesuffix("ts").removesuffix("_") or "base"
        return calibrated(task, rebuild(job, source, checkpoint))
    payload = torch.load(checkpoint or checkpoint_of(job), weights_only=False)
    model = task.make_model()
    model.load_state_dict(payload["model"])
    if kind == "base":
        return model
    for evaluator, state in zip(_evaluators(task, job), payload["evaluators"], strict=False):
        if isinstance(evaluator, WeightAverageEvaluator) and evaluator.name == kind:
            evaluator.load_state_dict(state, model)
            return evaluator.average.module
    raise AssertionError(f"checkpoint of {job.run_id} holds no state of {kind!r}")


def checkpoint_of(job: RunJob) -> Path:
    """The checkpoint of ``job``'s run as the store registered it, checked against its
    SHA-256 (``ValueError`` if the file changed since); a run without a registered checkpoint
    (it diverged) has the one in its run folder."""
    with ResultsStore(job.db) as store:
        return _checkpoint(store, job)


def _checkpoint(store: ResultsStore, job: RunJob) -> Path:
    """:func:`checkpoint_of` with an open store."""
    artifact = store.artifacts(job.run_id).get("checkpoint")
    if artifact is None:
        return job.run_dir / CHECKPOINT_NAME
    artifact.verify()
    return artifact.path


def _checkpoints(store: ResultsStore, job: _EnsembleJob) -> tuple[Path, ...]:
    """The checkpoints of ``job``'s members, checked here so that the workers need no store."""
    return tuple(_checkpoint(store, member) for member in job.members)


def _run_kinds(transforms: Sequence[str]) -> tuple[str, ...]:
    """The models a run with ``transforms`` evaluates: ``base``, each weight average, and with
    ``"ts"`` each of them temperature-scaled (``ts``, ``swa_ts``, ...)."""
    sources = ("base", *(name for name in transforms if name != "ts"))
    scaled = tuple("ts" if s == "base" else f"{s}_ts" for s in sources)
    return sources + (scaled if "ts" in transforms else ())


def ensemble_of(
    members: Sequence[nn.Module], scale: Callable[[nn.Module], nn.Module] | None = None
) -> nn.Module:
    """Members deployed as one model: the mean of their outputs (:class:`OutputEnsemble`), or
    with ``scale`` the post-hoc paper's TS per member → mean → TS, ``scale`` wrapping a model
    in its temperature (``partial(calibrated, task)`` fits it; ``TemperatureScaled`` gives
    the shape a saved state dict loads into)."""
    if scale is None:
        return OutputEnsemble(members)
    return scale(OutputEnsemble([scale(member) for member in members]))


def _ensemble_one(job: _EnsembleJob, checkpoints: Sequence[Path]) -> RunRecord:
    """Deploy the members of ``job`` (from ``checkpoints``, one per member) as one ensemble per
    kind (base and each weight average, each plain and, with ``"ts"``, scaled:
    :func:`ensemble_of`) at the final epoch; their val and test metrics, as the ensemble's run.
    A member that did not reach the final epoch (it diverged) makes the metrics NaN.
    """
    first = job.members[0]
    task = first.factory(first.size, first.data_seed)
    complete = all(
        torch.load(path, weights_only=False)["epoch"] == task.epochs for path in checkpoints
    )
    metrics: dict[str, float] = {}
    sources = ("base", *(name for name in first.transforms if name != "ts"))
    for kind, scaled in [(k, False) for k in sources] + [
        (k, True) for k in sources if "ts" in first.transforms
    ]:
        name = ("ens" if kind == "base" else f"{kind}_ens") + ("_ts" if scaled else "")
        if not complete:
            metrics[f"{name}_val_{task.primary_metric}"] = math.nan
            continue
        members = [rebuild(m, kind, path) for m, path in zip(job.members, checkpoints, strict=True)]
        ensemble = ensemble_of(members, partial(calibrated, task) if scaled else None)
        for split in ("val", "test"):
            values = task.evaluate(ensemble, split, primary_only=split == "val")
            metrics |= {f"{name}_{split}_{metric}": value for metric, value in values.items()}
    schedule = TrainConfig(
        task.epochs, task.batch_size, schedule=first.schedule, warmup=first.warmup
    )
    config = _run_config(first, task, schedule) | {"members": [m.run_id for m in job.members]}
    return _record(first, job.run_id, -1, config, [(task.epochs, metrics)])


def _record(
    job: RunJob,
    run_id: str,
    seed: int,
    config: Mapping[str, Any],
    epochs: Sequence[tuple[int, Mapping[str, float]]],
    artifacts: Sequence[Artifact] = (),
) -> RunRecord:
    """Run ``run_id`` with ``job``'s task, optimizer, lr and weight decay, as the store
    records it."""
    return RunRecord(
        run_id,
        task=job.task,
        optimizer=job.optimizer,
        lr=job.lr,
        weight_decay=job.weight_decay,
        seed=seed,
        config=config,
        epochs=tuple(epochs),
        artifacts=tuple(artifacts),
    )


def with_ensembles(
    summaries: list[Summary], ensembles: Mapping[tuple[str, float], Mapping[str, list[float]]]
) -> list[Summary]:
    """``summaries`` with each configuration's ensemble metrics added: one model over all
    seeds, so its value has no spread (std and half-width NaN)."""
    for summary in summaries:
        curves = ensembles.get((summary.optimizer, summary.lr), {})
        for name, values in curves.items():
            if name != "epoch":
                summary.mean[name] = values[-1]
                summary.std[name] = summary.half_width[name] = math.nan
    return summaries


def _run_one(job: RunJob) -> RunRecord:
    """Train one run (in a worker process) from its checkpoint, if it has one, to its last
    epoch; its record for the store. The worker writes only files under ``job.run_dir``.
    With ``job.ddp > 1`` the worker launches that many ranks, each of which trains."""
    if job.ddp > 1:
        return launch(_train_run, job, nprocs=job.ddp)
    return _train_run(job)


def _train_run(job: RunJob) -> RunRecord:
    """:func:`_run_one` in this process (one rank of the run under DDP)."""
    task = job.factory(job.size, job.data_seed)
    splits = task.splits()
    config = TrainConfig(
        epochs=task.epochs,
        batch_size=task.batch_size,
        seed=job.seed,
        schedule=job.schedule,
        warmup=job.warmup,
    )
    torch.manual_seed(job.seed)
    model = task.make_model()
    optimizer = make_optimizer(
        job.optimizer_reference or job.optimizer,
        model,
        lr=job.lr,
        weight_decay=job.weight_decay,
        **job.dopr,
    )
    evaluators = _evaluators(task, job)
    if getattr(optimizer, "preconditioner", None) is not None:
        evaluators.append(_ap_spectra(optimizer.preconditioner))
    record = _run_config(job, task, config)
    checkpoint = job.run_dir / CHECKPOINT_NAME
    try:
        history = train(
            model,
            optimizer,
            splits.train,
            task.loss,
            config,
            evaluators,
            run_dir=job.run_dir,
            progress=False,
        )
    except FloatingPointError:
        # The optimizer met non-finite activations: the run diverged. Its last row holds NaN
        # metrics (ranked last by the selection) and a `diverged` flag.
        done = torch.load(checkpoint, weights_only=False)["history"] if checkpoint.exists() else []
        failed = (len(done) + 1, {"val_loss": math.nan, "diverged": 1.0})
        return _record(job, job.run_id, job.seed, record, [*_epochs(done), failed])
    saved = Artifact.of("checkpoint", checkpoint, len(history), checkpoint_contents(evaluators))
    return _record(job, job.run_id, job.seed, record, _epochs(history), [saved])


def _run_config(job: RunJob, task: Task, config: TrainConfig) -> dict[str, Any]:
    """The settings of ``job``'s run as the store keeps them (the axes ``beyondloss runs``
    shows): the study, the task's size, data seed and budget, and each non-default setting."""
    record = {
        "study": job.study,
        "size": job.size,
        "data_seed": job.data_seed,
        "task_class": task.name,
        "task_fingerprint": fingerprint(task),
        "epochs": task.epochs,
        "batch_size": task.batch_size,
    }
    record |= {"task_reference": job.task_reference} if job.task_reference else {}
    if job.optimizer_reference:
        record |= {"optimizer_reference": job.optimizer_reference}
    record |= {"dopr": job.dopr} if job.dopr else {}
    if job.transforms:
        record |= {"transforms": list(job.transforms), "transform_every": job.transform_every}
    record |= {"eval_every": job.eval_every} if job.eval_every != 1 else {}
    if config.scheduled:
        record |= {"schedule": job.schedule, "warmup": job.warmup}
    record |= {"ddp": job.ddp} if job.ddp != 1 else {}
    return record


def _epochs(history: Sequence[Mapping[str, float]]) -> list[tuple[int, dict[str, float]]]:
    """A :func:`train` history as the store's ``(epoch, metrics)`` rows."""
    return [
        (int(entry["epoch"]), {name: v for name, v in entry.items() if name != "epoch"})
        for entry in history
    ]


def swa_start(epochs: int) -> int:
    """First epoch of the ``"swa"`` transform: SWA averages the second half of training."""
    return epochs // 2 + 1


def _transform_evaluators(task: Task, job: RunJob) -> list[Evaluator]:
    """The weight averages ``job.transforms`` asks for, each rolled out on val and test; with
    ``"ts"`` also each average and the base model temperature-scaled (``swa_ts_...``,
    ``ts_...``) at the same cadence."""
    deployments: dict[str, Deployment] = {
        "val": lambda model: task.evaluate(model, "val", primary_only=True),
        "test": lambda model: task.evaluate(model, "test"),
    }
    if "ts" in job.transforms:
        deployments["ts"] = calibrated_deployment(task, dict(deployments))  # type: ignore[arg-type]
    evaluators: list[Evaluator] = []
    for name in job.transforms:
        if name == "ts":
            continue
        average, per_step = weight_average(name, task.epochs)
        evaluator = StepAverageEvaluator if per_step else WeightAverageEvaluator
        evaluators.append(
            evaluator(name, average, deployments, job.transform_every, last_epoch=task.epochs)
        )
    if "ts" in job.transforms:
        evaluators.append(_deployed("ts", deployments["ts"], job.transform_every, task.epochs))
    return evaluators


def weight_average(name: str, epochs: int) -> tuple[WeightAverage, bool]:
    """The fresh average of weight transform ``name`` (one of :attr:`StudySpec.weight_transforms`)
    in a run of ``epochs`` epochs, and whether it is folded after every optimizer step."""
    if name == "swa":
        return SWA(start_epoch=swa_start(epochs)), False
    if name == "epoch-ema":
        return EMA(EPOCH_EMA_DECAY), False
    return EMA(_ema_decay(name), warmup=True), True


def _ema_decay(name: str) -> float:
    """The decay of a per-step EMA kind, ``ema0.999 → 0.999``."""
    decay = float(name.removeprefix("ema"))
    if ema_kind(decay) != name:
        raise ValueError(f"not a weight transform: {name!r}")
    return decay


def _deployed(name: str, deploy: Deployment, every: int, last_epoch: int) -> Evaluator:
    """Evaluator of ``deploy(model)`` as ``{name}_{metric}``, every ``every`` epochs and at
    ``last_epoch`` (no metrics between)."""

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        if epoch % every and epoch != last_epoch:
            return {}
        return {f"{name}_{metric}": float(value) for metric, value in deploy(model).items()}

    return evaluate


def _ap_spectra(preconditioner: ActivationPreconditioner) -> Evaluator:
    """Evaluator of the preconditioner's per-layer spectrum summary (``ap/<layer>/<field>``:
    condition number, effective rank, amplification, ...; see ``beyondloss.optim.diagnostics``).
    It reads Σ only, so the run's trajectory is unchanged."""

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        return preconditioner.spectrum_metrics()

    return evaluate


def _downstream(task: Task, split: str, every: int = 1) -> Evaluator:
    """Evaluator of ``task``'s downstream metrics on ``split``, prefixed ``<split>_``, every
    ``every`` epochs and at the last (no metrics between).

    The study reads only the primary metric of the validation split (for selection and τ) and
    of the test split's intermediate epochs (for curves and τ), so it asks for every metric only
    on the test split's final epoch (``primary_only`` otherwise; see :meth:`Task.evaluate`)."""

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        if epoch % every and epoch != task.epochs:
            return {}
        primary_only = split != "test" or epoch < task.epochs
        metrics = task.evaluate(model, split, primary_only=primary_only)
        return {f"{split}_{name}": value for name, value in metrics.items()}

    return evaluate


_LABEL_PARTS = {"swa": "SWA", "epoch-ema": "EMA-of-epochs", "ens": "Ens", "ts": "TS"}


def transform_label(name: str) -> str:
    """How reports name a transform: ``swa_ens_ts`` → ``SWA+Ens+TS``, ``ema0.999`` →
    ``EMA0.999/step`` (the per-step EMA), ``epoch-ema`` → ``EMA-of-epochs``."""
    return "+".join(_label_part(part) for part in name.split("_"))


def _label_part(part: str) -> str:
    if part in _LABEL_PARTS:
        return _LABEL_PARTS[part]
    return f"EMA{part.removeprefix('ema')}/step" if part.startswith("ema") else part


_DIAGNOSTICS = (
    "dim",
    "eigenvalue_max",
    "eigenvalue_min",
    "condition",
    "effective_rank",
    "amplification",
)
"""Per-layer fields of the activation preconditioner's spectrum shown in reports."""


def deploy_criteria(spec: StudySpec, primary: str) -> dict[str, tuple[str, str]]:
    """The criteria of "Which model to deploy" (:func:`deploy_choices`): val loss, downstream
    and each evaluated transform's own val metric, as ``{label: (metric, model prefix)}``."""
    criteria = {"val loss": ("val_loss", ""), "downstream": (f"val_{primary}", "")}
    return criteria | {
        f"post-hoc {transform_label(name)}": (f"{name}_val_{primary}", f"{name}_")
        for name in spec.evaluated
    }


def _deploy_table(spec: StudySpec, summaries: list[Summary], task: Task) -> str:
    """Which model to deploy: per optimizer, the test primary metric of the model each
    criterion selects (the lr, and for post-hoc criteria the transform), then the joint choice
    by the best validation metric over lr × {base, transforms}, per optimizer and overall, the
    test oracle and the joint choice's regret; below it, the regret of every criterion.
    ``†`` marks a post-hoc choice whose lr differs from the one the base model's downstream
    criterion picks (the transform reverses the lr ranking)."""
    primary, higher = task.primary_metric, task.higher_is_better[task.primary_metric]
    criteria = deploy_criteria(spec, primary)
    choices = deploy_choices(summaries, criteria, primary, higher)
    head = ["optimizer", *criteria, "joint (val over lr × model)"]
    head += ["oracle (test over lr × model)", "joint regret"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    regrets = ["| optimizer | " + " | ".join([*criteria, "joint"]) + " |"]
    regrets.append("|---|" + "--:|" * (len(criteria) + 1))
    for optimizer, choice in choices.items():
        base_lr = choice.picks["downstream"].summary.lr
        cells = [optimizer]
        for name in criteria:
            pick = choice.picks[name]
            mark = " †" if pick.prefix and pick.summary.lr != base_lr else ""
            test = format_cell(pick.summary, f"{pick.prefix}test_{primary}")
            cells.append(f"{test} @{format_lr(pick.summary.lr)}{mark}")
        cells += [_joint_cell(choice.picks["joint"], primary), _joint_cell(choice.oracle, primary)]
        cells.append(f"{choice.regret['joint']:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
        regrets.append(
            f"| {optimizer} | " + " | ".join(f"{r:.4g}" for r in choice.regret.values()) + " |"
        )
    joint = best_pick([c.picks["joint"] for c in choices.values()], "val", primary, higher)
    lines.append(
        "| **all optimizers** |" + " |" * len(criteria) + f" {joint.summary.optimizer}, "
        f"{_joint_cell(joint, primary)} | | |"
    )
    regret_text = (
        f"Regret of each criterion: |test {primary} of the test oracle − test {primary} of the "
        "criterion's choice|, per optimizer (0: the criterion found the best model on test)."
    )
    return "\n".join(lines) + "\n\n" + regret_text + "\n\n" + "\n".join(regrets)


def _checkpoint_table(spec: StudySpec, summaries: list[Summary], task: Task) -> str:
    """Per optimizer and model kind (base, each weight average): test primary metric at the
    final epoch (lr by the kind's final val metric), at the epoch the kind's own val metric
    selects in each run (lr by that selected val value; the mean selected epoch beside it), and
    the test oracle over epochs and lrs (:mod:`beyondloss.selection.checkpoints`)."""
    metric, higher = task.primary_metric, task.higher_is_better[task.primary_metric]
    head = ["optimizer", "model", "final epoch", "epoch selected by val", "selected epoch",
            "test oracle (not a selection)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|--:|--:|--:|--:|"]
    for prefix in ("", *(f"{name}_" for name in spec.weight_transforms)):
        final = select_lr(summaries, f"{prefix}val_{metric}", higher_is_better=higher)
        best = select_lr(summaries, f"{prefix}val_{metric}@best", higher_is_better=higher)
        oracle_name = f"{prefix}test_{metric}@oracle"
        for optimizer in spec.optimizer_labels:
            own = [s for s in summaries if s.optimizer == optimizer and oracle_name in s.mean]
            oracle = min(own, key=lambda s: rank_key(s.mean[oracle_name], higher))
            chosen = best[optimizer]
            cells = [
                optimizer,
                transform_label(prefix.removesuffix("_")) if prefix else "base",
                f"{format_cell(final[optimizer], f'{prefix}test_{metric}')} "
                f"@{format_lr(final[optimizer].lr)}",
                f"{format_cell(chosen, f'{prefix}test_{metric}@best')} @{format_lr(chosen.lr)}",
                f"{chosen.mean[f'{prefix}epoch@best']:.1f}",
                f"{format_cell(oracle, oracle_name)} @{format_lr(oracle.lr)}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _joint_cell(pick: Pick, primary: str) -> str:
    """``<model> @<lr>: <test metric>``, the model named by its transform label or ``base``."""
    model = transform_label(pick.prefix.removesuffix("_")) if pick.prefix else "base"
    test = format_cell(pick.summary, f"{pick.prefix}test_{primary}")
    return f"{model} @{format_lr(pick.summary.lr)}: {test}"


def _diagnostics_table(by_val_loss: Mapping[str, Summary], test_primary: str) -> str:
    """Per layer of each DoPr optimizer at its val-loss-selected lr: the final-epoch spectrum
    of its Σ (mean over seeds), beside the optimizer's test metric; layers whose amplification
    exceeds :data:`~beyondloss.optim.diagnostics.AMPLIFICATION_WARNING` are marked."""
    head = ["optimizer", "lr", test_primary, "layer", *_DIAGNOSTICS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|--:|---|" + "--:|" * len(_DIAGNOSTICS)]
    for summary in by_val_loss.values():
        layers = dict.fromkeys(
            name.split("/")[1] for name in summary.mean if name.startswith("ap/")
        )
        for layer in layers:
            values = [summary.mean.get(f"ap/{layer}/{field}", math.nan) for field in _DIAGNOSTICS]
            loud = values[-1] > AMPLIFICATION_WARNING
            cells = [f"{v:.4g}" for v in values[:-1]] + [
                f"{values[-1]:.4g}" + (" ⚠" if loud else "")
            ]
            lines.append(
                f"| {summary.optimizer} | {format_lr(summary.lr)} | "
                f"{summary.mean.get(test_primary, math.nan):.4g} | `{layer}` | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _transforms_table(
    spec: StudySpec,
    summaries: list[Summary],
    by_val_loss: Mapping[str, Summary],
    task: Task,
    directions: Mapping[str, bool],
) -> str:
    """Test primary metric of the base model and of each transform, each optimizer at the lr
    its criterion selects: val loss (naive), then each transform's own val metric (post-hoc)."""
    if not spec.evaluated:
        return ""
    higher = task.higher_is_better[task.primary_metric]
    test = [f"test_{task.primary_metric}"]
    test += [f"{name}_test_{task.primary_metric}" for name in spec.evaluated]
    blocks = [
        "Each optimizer at its val-loss-selected learning rate (naive selection):",
        "",
        markdown_table(list(by_val_loss.values()), test, directions),
    ]
    for name in spec.evaluated:
        criterion = f"{name}_val_{task.primary_metric}"
        chosen = select_lr(summaries, criterion, higher_is_better=higher)
        blocks += [
            "",
            f"Each optimizer at the learning rate with the best `{criterion}` (post-hoc "
            f"selection for {transform_label(name)}):",
            "",
            markdown_table(
                list(chosen.values()), [f"{name}_test_{task.primary_metric}"], directions
            ),
        ]
    return "\n".join(blocks)


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


def _cadence_text(spec: StudySpec) -> str:
    """When the base model and the transforms are rolled out."""
    k = spec.eval_every
    base = "every epoch" if k == 1 else f"every {k} epochs and at the last"
    text = f"The base model is rolled out {base} (val loss every epoch)"
    if spec.run_transforms:
        every = spec.transform_every
        plural = "s" if every > 1 else ""
        text += f"; the run's transforms every {every} epoch{plural} and at the last"
    return text + "."


def _dopr_text(spec: StudySpec) -> str:
    """The DoPr settings in words, e.g. ``cov_every=10, ema_decay=0.9 (others default)``."""
    if not spec.dopr:
        return "DoPr's defaults"
    return ", ".join(f"{key}={value}" for key, value in spec.dopr.items()) + " (others default)"


_GAINS_TEXT = (
    "Gain: mean over seed pairs of the final-epoch difference, oriented so that positive means "
    "DoPr is better (DoPr − base for ↑ metrics, base − DoPr for ↓), ± {ci} half-width "
    "(Student t, n − 1 dof). Seed s of DoPr-X is paired with seed s of X (same initialisation "
    "and data order), each at the lr the criterion selected for it. p: two-sided exact "
    "sign-flip test of a zero mean difference; its smallest value is 2/2ⁿ for n pairs."
)

_KENDALL_TEXT = (
    "Kendall τ_b between `val_loss` and the downstream metric, signed so that +1 means lower "
    "val loss ⇔ better downstream (val loss perfectly predictive), 0 unrelated, −1 exactly "
    "misleading. All checkpoints: every (run, epoch) of every configuration; within "
    "configurations: τ over one configuration's (seed, epoch) checkpoints, averaged; final "
    "epochs: one point per run, as learning-rate selection sees them (p: scipy's test of τ = 0)."
)


def _markdown(
    spec: StudySpec,
    task: Task,
    command: str,
    wall_seconds: float,
    trained: tuple[str, ...],
    skipped: list[str],
    tables: Mapping[str, str],
) -> str:
    primary = f"val_{task.primary_metric}"
    best = "highest" if task.higher_is_better[task.primary_metric] else "lowest"
    lrs = ", ".join(format_lr(lr) for lr in spec.grid_lrs)
    pairs = dopr_pairs(spec.optimizer_labels)
    lines = [
        f"# Test-time feedback study `{spec.name}`",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_seconds:.1f} s; runs trained: {len(trained)}, already complete: "
        f"{len(skipped)}; workers: {spec.workers}",
        "",
        f"Task `{spec.task}` ({spec.size}, `{task.name}`): {task.epochs} epochs, batch size "
        f"{task.batch_size}, data seed {DATA_SEED}. Seeds 0–{spec.grid_seeds - 1}; learning "
        f"rates {lrs}; weight decay {spec.weight_decay:g}; DoPr settings: {_dopr_text(spec)}. "
        f"{_cadence_text(spec)}",
        f"Values at the final epoch ({task.epochs}): mean ± {CI_LABEL} half-width over the n "
        "seeds (Student t, n − 1 dof; none shown for n = 1; `table.csv` also has the std); "
        "↑ higher is better, ↓ lower is better.",
        "",
        "## Selected by one-step validation loss",
        "",
        "Each optimizer at the learning rate with the lowest mean final `val_loss`.",
        "",
        tables["val_loss"],
        "",
        f"## Selected by downstream validation metric `{primary}`",
        "",
        f"Each optimizer at the learning rate with the {best} mean final `{primary}`.",
        "",
        tables["downstream"],
        "",
        "## DoPr vs base",
        "",
    ]
    if pairs:
        lines += [_GAINS_TEXT.format(ci=CI_LABEL), "", tables["dopr_vs_base"], ""]
    else:
        lines += ["No optimizer X ran together with dopr-X.", ""]
    lines += [
        "## Which model to deploy",
        "",
        f"Test `{task.primary_metric}` of the model each criterion selects (mean ± {CI_LABEL} "
        "half-width over seeds; ensembles are one model, without a spread), at the learning "
        "rate after `@`. Val loss and downstream select the base model's lr; post-hoc "
        "criteria select the lr by the transformed model's own validation metric (†: another "
        "lr than the base model's downstream choice). Joint: the best validation metric over "
        "every lr and every model (base and transforms) of the optimizer, and over all "
        "optimizers in the last row. Oracle: the best *test* value over the same candidates "
        "(not a selection a user can make); joint regret: how far the joint choice falls short "
        "of it.",
        "",
        tables["deploy"],
        "",
    ]
    lines += _checkpoint_section(task, tables) + _optional_sections(spec, task, tables)
    lines += [
        "## Val loss vs downstream metric",
        "",
        _KENDALL_TEXT,
        "",
        tables["kendall"],
        "",
        "![every checkpoint: val loss against the downstream metric](val_loss_vs_downstream.png)",
        "",
        "## All configurations",
        "",
        tables["all"],
        "",
        "![val loss and test metric per epoch at the val-loss-selected lr](curves.png)",
    ]
    return "\n".join(lines)


def _checkpoint_section(task: Task, tables: Mapping[str, str]) -> list[str]:
    """The report's section on checkpoint choice (final epoch, val-selected epoch, oracle)."""
    lines: list[str] = []
    lines += [
        "## Checkpoint choice: final epoch or the epoch validation selects",
        "",
        f"Test `{task.primary_metric}` of each model kind (mean ± {CI_LABEL} half-width over "
        "seeds) at the final epoch, and at the epoch each run's own validation "
        f"`{task.primary_metric}` of that model selects among its evaluated epochs (the lr "
        "selected by the same value; selected epoch: the mean over seeds). The test oracle is "
        "each run's best test value over its evaluated epochs, at the best lr: not a choice a "
        "user can make, an upper bound on checkpoint selection.",
        "",
        tables["checkpoints"],
        "",
    ]
    return lines


def _optional_sections(spec: StudySpec, task: Task, tables: Mapping[str, str]) -> list[str]:
    """The report's sections that only some studies have: DoPr diagnostics, transforms."""
    lines: list[str] = []
    if tables["diagnostics"]:
        lines += [
            "## DoPr diagnostics",
            "",
            "Spectrum of each layer's activation second moment Σ at the final epoch, mean over "
            "seeds, for each DoPr optimizer at its val-loss-selected learning rate: "
            "amplification is max/min of 1/(σᵢ + λ), how much more the preconditioner scales "
            "the least-excited input direction than the most-excited; ⚠ marks amplification "
            f"above {AMPLIFICATION_WARNING:g}× (raise `damping`, or leave the layer out with "
            "`exclude`). "
            "Per-epoch values are in the store (`ap/<layer>/<field>`).",
            "",
            tables["diagnostics"],
            "",
        ]
    if spec.evaluated:
        lines += [
            "## Weight averages and ensembles, judged by their rollouts",
            "",
            _transforms_text(spec, task),
            "",
            tables["transforms"],
            "",
        ]
    return lines


def _transforms_text(spec: StudySpec, task: Task) -> str:
    """What each transform the study evaluates is, in one paragraph."""
    text = {
        "swa": f"SWA averages the end-of-epoch weights from epoch {swa_start(task.epochs)} on.",
        "ema": "EMA/step averages the weights after every optimizer step, with decay "
        f"{', '.join(f'{d:g}' for d in spec.ema_decays)} and the warmup min(d, (1+k)/(10+k)) "
        "over the k steps folded.",
        "epoch-ema": "EMA-of-epochs averages the end-of-epoch weights (not every step) with "
        f"decay {EPOCH_EMA_DECAY} per epoch and no warmup.",
        "ens": f"Ens deploys the final models of the {spec.grid_seeds} seeds as one model (the "
        "mean of their outputs; SWA+Ens: of their SWA models), a single model per "
        "configuration and so without a spread.",
        "ts": "TS divides the logits by the temperature that minimises the validation NLL "
        "(fitted for each model and epoch it is applied to; it never changes the argmax); "
        "Ens+TS scales each member, averages the logits and scales the mean again.",
    }
    sentences = [text[name] for name in spec.transforms]
    sentences.append(
        "Every transformed model is evaluated by the task's own rollouts, like the base model."
    )
    return " ".join(sentences)


def _summary_markdown(
    specs: list[StudySpec],
    results: Mapping[str, StudyResult],
    failures: Mapping[str, str],
    command: str,
    wall_seconds: float,
) -> str:
    first = specs[0]
    failed = ", ".join(failures) or "none"
    lines = [
        f"# Test-time feedback studies on every task (`ttf-all-{first.size}{first.suffix}`)",
        "",
        f"Command: `{command}`  ",
        f"Total wall time: {wall_seconds:.1f} s; tasks: {', '.join(s.task for s in specs)}; "
        f"failed: {failed}",
        "",
        f"Optimizers {', '.join(first.optimizer_labels)}; seeds 0–{first.grid_seeds - 1}; "
        f"weight decay {first.weight_decay:g}; DoPr settings: {_dopr_text(first)}. Per task: "
        "each optimizer at its val-loss-selected learning rate (final epoch, mean ± "
        f"{CI_LABEL} half-width over seeds), the paired gain of DoPr over its base, and the "
        "Kendall τ between val loss and the downstream metric. Each task's report has the "
        "downstream-selected table, every configuration and the plots.",
        "",
        _GAINS_TEXT.format(ci=CI_LABEL),
        "",
        _KENDALL_TEXT,
    ]
    for spec in specs:
        lines += ["", f"## {spec.task}", ""]
        if spec.task in failures:
            last = failures[spec.task].strip().splitlines()[-1]
            lines += [f"Failed: `{last}`"]
            continue
        result = results[spec.task]
        lines += [
            f"[Full report](../{spec.name}/report.md); wall time {result.wall_seconds:.1f} s; "
            f"runs trained: {len(result.trained)}, already complete: {len(result.skipped)}.",
            "",
            "Selected by one-step validation loss:",
            "",
            result.tables["val_loss"],
            "",
        ]
        if result.gains:
            lines += ["DoPr vs base:", "", result.tables["dopr_vs_base"], ""]
        if first.evaluated:
            lines += ["Which model to deploy:", "", result.tables["deploy"], ""]
        lines += ["Val loss vs downstream metric:", "", result.tables["kendall"]]
    return "\n".join(lines)
