"""The `Task` protocol: what every test-time-feedback task provides to the training loop.

A task owns its data, its model architecture, its one-step training loss and its downstream
(deployed, rollout) evaluation. It never imports an optimizer and the loop never branches on
the task's kind.
"""

from __future__ import annotations

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
