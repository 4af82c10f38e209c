"""The `Task` protocol: what every test-time-feedback task provides to the training loop.

A task owns its data, its model architecture, its one-step training loss and its downstream
(deployed, rollout) evaluation. It never imports an optimizer and the loop never branches on
the task's kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Splits:
    """Training, validation and test datasets of one task (already generated, deterministic)."""

    train: Dataset
    val: Dataset
    test: Dataset


@runtime_checkable
class Task(Protocol):
    """A test-time-feedback task.

    Attributes
    ----------
    name:
        Short identifier used on the command line and in the results store.
    higher_is_better:
        For each downstream metric name returned by :meth:`evaluate`, whether larger is better.
    primary_metric:
        The downstream metric used to rank configurations ("selected by downstream").
    epochs, batch_size:
        The training budget of this task at its configured size (the same for every optimizer).
    """

    name: str
    primary_metric: str
    higher_is_better: Mapping[str, bool]
    epochs: int
    batch_size: int

    def splits(self) -> Splits:
        """The task's data splits, generated deterministically from the task's seed."""
        ...

    def make_model(self) -> nn.Module:
        """The model a run starts from: freshly initialised (from the global torch RNG), or, for a
        fine-tuning task, a fresh copy of the task's pretrained weights (``sft``)."""
        ...

    def loss(self, model: nn.Module, batch: object) -> torch.Tensor:
        """One-step training loss (scalar, mean over the batch) on one collated batch."""
        ...

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        """Downstream metrics of the deployed model (rollouts) on ``split`` ("val" or "test").

        With ``primary_only`` the task may skip work that only the other metrics need; the
        result must still hold :attr:`primary_metric`, with the same value as without it.
        Studies ask for it where only the primary metric is read (selection on the validation
        split, per-epoch curves)."""
        ...


def require_positive(config: Any, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first of ``config``'s integer fields ``names`` below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")


class ConfiguredTask:
    """Plumbing the tasks share: ``self.config`` (a frozen dataclass) carries the training budget
    (``epochs``, ``batch_size``), and :meth:`_data` builds the task's data from it once, on first
    use, with the class's ``build_data(config)``."""

    config: Any
    build_data: ClassVar[Callable[[Any], Any]]
    _cached: Any = None

    @property
    def epochs(self) -> int:
        """Training epochs at the configured size."""
        return self.config.epochs

    @property
    def batch_size(self) -> int:
        """Training samples per optimizer step."""
        return self.config.batch_size

    def _data(self) -> Any:
        if self._cached is None:
            self._cached = type(self).build_data(self.config)
        return self._cached


@runtime_checkable
class ClassifierTask(Task, Protocol):
    """A task whose model outputs class logits ``(N, C)``: output-space transforms (temperature
    scaling) are fitted on its validation logits and labels, then deployed by :meth:`evaluate`."""

    def predict(self, model: nn.Module, split: str) -> torch.Tensor:
        """Logits ``(N, C)`` of ``model`` on ``split``'s inputs (float32, CPU, no grad)."""
        ...

    def labels(self, split: str) -> torch.Tensor:
        """Observed (possibly noisy) integer labels ``(N,)`` of ``split``."""
        ...


class SelectedMetric:
    """``task`` judged by another of its downstream metrics: ``primary_metric`` is ``metric``.

    Every study reads the task's primary metric (selection, curves, τ, reports); this view
    makes a study select and report by ``metric`` instead, e.g. ``nll`` on a noisy-label
    classifier, where temperature scaling changes NLL but not the error. :meth:`evaluate` asks
    the task for every metric whenever the study would have asked for the primary one only;
    everything else is the task's own.
    """

    def __init__(self, task: Task, metric: str) -> None:
        if metric not in task.higher_is_better:
            raise ValueError(
                f"task {task.name} has no metric {metric!r}; it has "
                f"{', '.join(task.higher_is_better)}"
            )
        self.task = task
        self.primary_metric = metric

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        """The task's metrics, all of them where ``primary_only`` would drop ``metric``."""
        primary_only = primary_only and self.primary_metric == self.task.primary_metric
        return self.task.evaluate(model, split, primary_only=primary_only)

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not yet set (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)


def check_epochs(epochs: object) -> None:
    """``ValueError`` unless ``epochs`` is an integer >= 1 (a training budget)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")


class Budgeted:
    """``task`` trained for ``epochs`` epochs instead of its own budget; everything else
    (data, model, loss, rollouts, batch size) is the task's own. Studies use it for
    ``--epochs``."""

    def __init__(self, task: Task, epochs: int) -> None:
        check_epochs(epochs)
        self.task = task
        self.epochs = epochs

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not yet set (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)


TASK_METHODS = ("splits", "make_model", "loss", "evaluate")
"""Methods every task provides (see :class:`Task`)."""


def check_task(task: object, source: str = "the task") -> None:
    """``ValueError`` naming, in one line, the first requirement of :class:`Task` that ``task``
    (built by ``source``) misses: a string ``name``; positive integer ``epochs`` and
    ``batch_size``; a mapping ``higher_is_better`` of metric names to bools that holds
    ``primary_metric``; callable ``splits``, ``make_model``, ``loss`` and ``evaluate``.

    Run by studies on every task a factory returns, before any run trains.
    """
    where = f"{source} ({type(task).__name__})"
    missing = [name for name in (*Task.__annotations__, *TASK_METHODS) if not hasattr(task, name)]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} (see beyondloss.tasks.base.Task)")
    if not isinstance(task.name, str) or not task.name:
        raise ValueError(f"{where}: name must be a non-empty string, got {task.name!r}")
    for budget in ("epochs", "batch_size"):
        value = getattr(task, budget)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {budget} must be an integer >= 1, got {value!r}")
    directions = task.higher_is_better
    if not isinstance(directions, Mapping) or not all(
        isinstance(key, str) and isinstance(value, bool) for key, value in directions.items()
    ):
        raise ValueError(f"{where}: higher_is_better must map metric names to True/False")
    if task.primary_metric not in directions:
        raise ValueError(
            f"{where}: primary_metric {task.primary_metric!r} is not in higher_is_better "
            f"({', '.join(directions) or 'empty'})"
        )
    not_callable = [name for name in TASK_METHODS if not callable(getattr(task, name))]
    if not_callable:
        raise ValueError(f"{where}: {', '.join(not_callable)} must be methods")


def describe(task: Task) -> dict[str, Any]:
    """What defines ``task`` for run identity: its class, budget, metrics and configuration
    (``task.config`` when it is a dataclass, else the task's plain attributes: numbers,
    strings, booleans and tuples or lists of them). Data a task generates from these is
    covered through them; data it reads from elsewhere is not."""
    inner = task
    while isinstance(inner, (Budgeted, SelectedMetric)):
        inner = inner.task
    config = getattr(inner, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        settings: Any = dataclasses.asdict(config)
    else:
        plain = (int, float, str, bool, type(None))
        settings = {
            key: value
            for key, value in sorted(vars(inner).items())
            if not key.startswith("_")
            and (
                isinstance(value, plain)
                or (isinstance(value, (tuple, list)) and all(isinstance(v, plain) for v in value))
            )
        }
    return {
        "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "name": task.name,
        "epochs": task.epochs,
        "batch_size": task.batch_size,
        "primary_metric": task.primary_metric,
        "higher_is_better": dict(task.higher_is_better),
        "config": settings,
    }


def fingerprint(task: Task) -> str:
    """SHA-256 (hex) of :func:`describe` as canonical JSON: two tasks with the same fingerprint
    train and deploy alike, and a changed definition gets a new one."""
    text = json.dumps(describe(task), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()
