"""Tasks and the registry that names them on the command line: the test-time-feedback tasks
(rollouts; ``sft`` fine-tunes a pretrained character-level model on instructions) and
classification under label noise (``noisy-*``, the post-hoc reversal setting:
digits with 40 % symmetric noise, tabular with 30 % class-dependent noise).

:data:`TASKS` maps a task name to a factory ``(size, data_seed) -> Task``; ``size`` is one of
:data:`SIZES` ("quick" for studies that finish in minutes on a laptop, "full" for the reported
numbers) and ``data_seed`` seeds the task's data. Adding a built-in task adds one entry here;
a user's own task needs no change to the package: :func:`task_factory` also resolves installed
plugins and ``module:factory`` / ``file.py:factory`` references (:class:`ReferencedTask`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from beyondloss.references import canonical, check_callable, resolve
from beyondloss.tasks.base import (
    Budgeted,
    ClassifierTask,
    SelectedMetric,
    Splits,
    Task,
    check_epochs,
    check_task,
    fingerprint,
)
from beyondloss.tasks.dynamics import Lorenz63Task, Lorenz96Task, LorenzConfig
from beyondloss.tasks.finetuning import make_finetuning_task
from beyondloss.tasks.flow import DATASETS as FLOW_DATASETS
from beyondloss.tasks.flow import make_flow_task
from beyondloss.tasks.noisy_labels import make_noisy_task
from beyondloss.tasks.sequences import make_sequence_task

SIZES = ("quick", "full")
"""Task sizes every factory accepts."""

TaskFactory = Callable[[str, int], Task]
"""``(size, data_seed) -> Task``; ``size`` is one of :data:`SIZES`."""


def selecting(factory: TaskFactory, metric: str, size: str, data_seed: int) -> Task:
    """The task of ``factory`` judged by ``metric`` (:class:`SelectedMetric`); bind ``factory``
    and ``metric`` with ``functools.partial`` for a picklable factory."""
    return SelectedMetric(factory(size, data_seed), metric)


def budgeted(factory: TaskFactory, epochs: int, size: str, data_seed: int) -> Task:
    """The task of ``factory`` trained for ``epochs`` epochs (:class:`Budgeted`); bind
    ``factory`` and ``epochs`` with ``functools.partial`` for a picklable factory."""
    return Budgeted(factory(size, data_seed), epochs)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown task size {size!r}; expected one of {', '.join(SIZES)}")


def lorenz(size: str, data_seed: int) -> Lorenz63Task:
    """Lorenz-63 forecasting at :meth:`LorenzConfig.quick` or :meth:`LorenzConfig.full`."""
    _check_size(size)
    make_config = LorenzConfig.quick if size == "quick" else LorenzConfig.full
    return Lorenz63Task(make_config(data_seed))


def lorenz96(size: str, data_seed: int) -> Lorenz96Task:
    """Lorenz-96 forecasting (10 sites, F = 8) at the Lorenz sizes: a chaotic family held out
    from Lorenz-63."""
    _check_size(size)
    make_config = LorenzConfig.quick if size == "quick" else LorenzConfig.full
    return Lorenz96Task(make_config(data_seed, system="lorenz96"))


def behavior_cloning(size: str, data_seed: int, env: str) -> Task:
    """MuJoCo behavior cloning (:mod:`beyondloss.tasks.control`); imported on use, since it
    needs the optional ``control`` extra (gymnasium + MuJoCo)."""
    from beyondloss.tasks.control import make_control_task

    return make_control_task(size, data_seed, env)


TASKS: dict[str, TaskFactory] = {
    "lorenz": lorenz,
    "lorenz96": lorenz96,
    "sort": partial(make_sequence_task, problem="sort"),
    "sft": make_finetuning_task,
    **{f"flow-{name}": partial(make_flow_task, dataset=name) for name in FLOW_DATASETS},
    "bc-pendulum": partial(behavior_cloning, env="pendulum"),
    "bc-reacher": partial(behavior_cloning, env="reacher"),
    "bc-hopper": partial(behavior_cloning, env="hopper"),
    "bc-halfcheetah": partial(behavior_cloning, env="halfcheetah"),
    "noisy-digits": partial(make_noisy_task, dataset="digits", noise=0.4, kind="symmetric"),
    "noisy-tabular": partial(make_noisy_task, dataset="tabular", noise=0.3, kind="class"),
}
"""Task name → factory ``(size, data_seed) -> Task``."""


QUICK_SUITE = ("lorenz", "sort", "flow-digits", "bc-pendulum", "bc-reacher", "noisy-digits")
"""One task per family, the tasks of ``study all --size quick``: a chaotic system, a sequence
model, a flow sampler, two control policies and a noisy-label classifier."""


def suite(size: str) -> tuple[str, ...]:
    """The tasks a suite of ``size`` studies: :data:`QUICK_SUITE` at quick size (the registered
    ones among them), every registered task at full size."""
    _check_size(size)
    if size == "quick":
        return tuple(name for name in QUICK_SUITE if name in TASKS)
    return tuple(TASKS)


TASK_GROUP = "beyondloss.tasks"
"""Entry-point group of installed task plugins (``name = "module:factory"``)."""


@dataclass(frozen=True)
class ReferencedTask:
    """The factory a reference names (:mod:`beyondloss.references`): an installed plugin's
    name, ``module:factory`` or ``path/to/file.py:factory``. It pickles as the reference text
    and resolves it in the process that calls it, so spawned workers, Ray tasks, DDP ranks and
    a fresh interpreter loading an export all build the same task. Every task it returns is
    checked against the :class:`Task` contract (:func:`check_task`)."""

    reference: str

    def resolve(self) -> TaskFactory:
        """The factory the reference names; ``ValueError`` in one line if there is none."""
        found = resolve(self.reference, TASK_GROUP, "task", tuple(TASKS))
        return check_callable(found, self.reference, "task")

    def __call__(self, size: str, data_seed: int) -> Task:
        task = self.resolve()(size, data_seed)
        check_task(task, f"the task {self.reference!r}")
        return task


def task_factory(name: str) -> TaskFactory:
    """The factory of ``name``: the registry's (:data:`TASKS`), else a :class:`ReferencedTask`
    (resolved now, so that a bad reference fails here, in one line: ``ValueError``)."""
    if name in TASKS:
        return TASKS[name]
    factory = ReferencedTask(canonical(name))
    factory.resolve()
    return factory


def make_task(name: str, size: str = "quick", seed: int = 0) -> Task:
    """The task registered as ``name`` at ``size`` with data seed ``seed``.

    Raises ``ValueError`` naming the known tasks (or sizes) if ``name`` (or ``size``) is unknown.
    """
    _check_size(size)
    return task_factory(name)(size, seed)


__all__ = [
    "QUICK_SUITE",
    "SIZES",
    "TASKS",
    "TASK_GROUP",
    "Budgeted",
    "ClassifierTask",
    "ReferencedTask",
    "SelectedMetric",
    "Splits",
    "Task",
    "TaskFactory",
    "budgeted",
    "check_epochs",
    "check_task",
    "fingerprint",
    "lorenz",
    "lorenz96",
    "make_task",
    "selecting",
    "suite",
    "task_factory",
]
