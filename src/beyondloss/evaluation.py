"""Evaluators with state: weight-space transforms judged by what they do when deployed.

An evaluator is a callable ``(model, epoch) -> metrics`` that the training loop calls after
each epoch (:data:`beyondloss.train.Evaluator`). One that also has ``state_dict()`` and
``load_state_dict(state, model)`` is *checkpointable*: :func:`beyondloss.train.train` saves
its state in every checkpoint and restores it on resume, so a killed run continues with, for
example, the same weight average it had.

:class:`WeightAverageEvaluator` folds the end-of-epoch weights into an SWA or EMA average
(:mod:`beyondloss.posthoc.averaging`) and evaluates the *averaged* model with the task's own
``evaluate``: a weight-averaged policy, flow, dynamics model or generator is rolled out exactly
as the base model is, so post-hoc transforms are compared with the base on the deployed metric.

:class:`StepAverageEvaluator` is the same for an average folded after every optimizer step
(the per-step EMA of the DoPr paper's protocol): the loop calls its ``on_step`` after each
step (:class:`beyondloss.train.StepHook`), and it evaluates the average at the epoch's end.

:class:`LogitsEvaluator` puts the :class:`~beyondloss.posthoc.tracker.PosthocTracker` (per-epoch
logits of a classifier and its SWA, for temperature scaling and ensembles chosen after training)
in the same loop, checkpointed the same way.

Temperature scaling is an output-space transform: :func:`calibrated` wraps a model of a
:class:`~beyondloss.tasks.base.ClassifierTask` with the temperature fitted on its validation
logits, and :func:`calibrated_deployment` deploys the wrapped model. It composes with the
others: a ``"ts"`` deployment of a :class:`WeightAverageEvaluator` scales the averaged model
(SWA → TS), and an ensemble of calibrated members, scaled again, is the post-hoc paper's
SWA → TS per member → mean → TS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from beyondloss.posthoc.averaging import WeightAverage
from beyondloss.posthoc.temperature import TemperatureScaled, TemperatureScaling
from beyondloss.posthoc.tracker import PosthocTracker
from beyondloss.tasks.base import ClassifierTask

Deployment = Callable[[nn.Module], Mapping[str, float]]
"""``model -> metrics``: how a model is judged when deployed, e.g. ``task.evaluate`` on a split."""


def calibrated(task: ClassifierTask, model: nn.Module) -> TemperatureScaled:
    """``model`` with its logits divided by ``T*``, the temperature that minimises the NLL of
    its validation logits under the observed validation labels (see
    :class:`~beyondloss.posthoc.temperature.TemperatureScaling`)."""
    scaling = TemperatureScaling().fit(task.predict(model, "val"), task.labels("val"))
    return TemperatureScaled(model, scaling.temperature)


def calibrated_deployment(
    task: ClassifierTask, deployments: Mapping[str, Deployment]
) -> Deployment:
    """Deployment of the temperature-scaled model: fit ``T*`` on val (:func:`calibrated`), then
    ``{prefix}_{metric}`` of each of ``deployments`` applied to the scaled model, and
    ``temperature``."""

    def deploy(model: nn.Module) -> dict[str, float]:
        scaled = calibrated(task, model)
        metrics = {"temperature": scaled.temperature.item()}
        for prefix, deployment in deployments.items():
            metrics |= {f"{prefix}_{name}": value for name, value in deployment(scaled).items()}
        return metrics

    return deploy


class WeightAverageEvaluator:
    """Metrics ``{name}_{metric}`` of the weight average ``average`` of the end-of-epoch models.

    Parameters
    ----------
    name:
        Prefix of the metrics, e.g. ``"swa"`` gives ``swa_val_vpt``.
    average:
        The averaging rule (:class:`~beyondloss.posthoc.averaging.SWA` or ``EMA``); its
        ``start_epoch`` says from which epoch the end-of-epoch weights are folded in.
    deployments:
        ``{prefix: deployment}``, e.g. ``{"val": ..., "test": ...}``; each deployment's metrics
        appear as ``{name}_{prefix}_{metric}``.
    every:
        Evaluate every ``every`` epochs (the average is still updated every epoch), and
        always at ``last_epoch``; between, the evaluator returns no metrics.
    last_epoch:
        The run's last epoch, always evaluated.
    """

    def __init__(
        self,
        name: str,
        average: WeightAverage,
        deployments: Mapping[str, Deployment],
        every: int = 1,
        last_epoch: int | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.name = name
        self.average = average
        self.deployments = dict(deployments)
        self.every = every
        self.last_epoch = last_epoch

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self.average.update(model, epoch)
        return self._evaluate(epoch)

    def _due(self, epoch: int) -> bool:
        """Whether the average is evaluated at ``epoch`` (it must hold a snapshot)."""
        due = epoch % self.every == 0 or epoch == self.last_epoch
        return due and self.average.n_averaged > 0

    def _evaluate(self, epoch: int) -> dict[str, float]:
        """The average's metrics if ``epoch`` is due (:meth:`_due`), else none."""
        if not self._due(epoch):
            return {}
        averaged = self.average.module
        return {
            f"{self.name}_{prefix}_{metric}": float(value)
            for prefix, deploy in self.deployments.items()
            for metric, value in deploy(averaged).items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The average's state (tensors and plain values only)."""
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore the average; ``model`` is the run's model, used as the template."""
        self.average.load_state_dict(state, model)


class StepAverageEvaluator(WeightAverageEvaluator):
    """:class:`WeightAverageEvaluator` of an average folded after every optimizer step.

    :meth:`on_step` folds the model's weights (without recomputing BatchNorm statistics, which
    happens once before each evaluation, at the epochs it is due); calling the evaluator at the
    end of an epoch only evaluates. ``average.start_epoch`` is ignored: every step is folded."""

    def on_step(self, model: nn.Module) -> None:
        """Fold the weights of the step just taken into the average."""
        self.average.update(model, self.average.start_epoch, recompute_bn=False)

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self._due(epoch):
            self.average.recompute_bn()
        return self._evaluate(epoch)


class LogitsEvaluator:
    """The tracker's metrics each epoch, and its logits and averages in every checkpoint.

    Returns the tracker's ``{kind}/{split}_{metric}`` (see
    :class:`~beyondloss.posthoc.tracker.PosthocTracker`) and, for the base model, the names a
    study reads for every task: ``{split}_{metric}`` (``val_error``, ``test_clean_nll``, ...)
    and ``val_loss``, the base model's val NLL. All are computed from the float16 logits the
    tracker stores, so they are exactly what post-hoc selection sees.
    """

    name = "logits"

    def __init__(self, tracker: PosthocTracker) -> None:
        self.tracker = tracker

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        metrics = self.tracker(model, epoch)
        base = {
            name.removeprefix("base/"): value
            for name, value in metrics.items()
            if name.startswith("base/")
        }
        return metrics | base | {"val_loss": metrics["base/val_nll"]}

    def state_dict(self) -> dict[str, Any]:
        """The tracker's logits, averages and kept states (tensors only)."""
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore the tracker; its averages are rebuilt on ``model``."""
        self.tracker.load_state_dict(state, model)
