"""Rebuild the model a study selects and write its weights, so that it can be deployed.

A study selects, for each optimizer, a configuration by a criterion (:data:`CRITERIA`): the
one-step validation loss (naive), the downstream validation metric, or a transform's own
validation metric (post-hoc selection of that transform). :func:`select_model` applies the
same rule over the stored results, then picks the deployed run among the configuration's seeds
by the same validation metric (a seed ensemble deploys them all). :func:`export_model` rebuilds
that model from the run checkpoints (the final weights, or the weight average the run kept) and
writes one file; :func:`load_model` turns the file back into a model of the task's own
architecture (``task.make_model()``, or an :class:`~beyondloss.posthoc.ensemble.OutputEnsemble`
of them), whose test metrics are those the store holds for it: the rebuilt model is the one the
run evaluated, so on the same machine with one torch thread they agree exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beyondloss.evaluation import calibrated
from beyondloss.posthoc.ensemble import OutputEnsemble
from beyondloss.posthoc.temperature import TemperatureScaled
from beyondloss.selection.configs import (
    best_pick,
    deploy_choices,
    rank_key,
    select_lr,
    summarize,
)
from beyondloss.store import ResultsStore
from beyondloss.study.ttf import (
    DATA_SEED,
    STORE_NAME,
    StudySpec,
    deploy_criteria,
    ensemble_of,
    grid_configs,
    rebuild,
    run_job,
    with_ensembles,
)
from beyondloss.tasks import Task, task_factory

CRITERIA = ("val_loss", "downstream")
"""Criteria of every study; a study with transforms adds each transform's name (post-hoc)."""

JOINT = "joint"
"""The criterion of the report's joint choice: the best validation metric over every lr and
every model (base and each transform) of the optimizers (``beyondloss.selection.configs.
deploy_choices``), so ``--select joint`` exports the model the report's joint column names."""

FORMAT_VERSION = 1
"""Version of the exported file's layout."""


@dataclass(frozen=True)
class SelectedModel:
    """The model a criterion selects for one optimizer.

    Attributes
    ----------
    criterion, metric:
        The criterion (:data:`CRITERIA` or a transform name) and the validation metric it ranks
        by, e.g. ``"swa"`` and ``"swa_val_vpt"``.
    optimizer, lr:
        The selected configuration.
    kind:
        ``"base"`` or the transform deployed (``"swa"``, ``"ens"``, ``"swa_ens"``, ...).
    run_ids:
        The runs whose weights make the model: one, or every seed for an ensemble.
    stored:
        The model's final test metrics in the store, without the ``test_`` prefix.
    """

    criterion: str
    metric: str
    optimizer: str
    lr: float
    kind: str
    run_ids: tuple[str, ...]
    stored: Mapping[str, float]


def criteria(spec: StudySpec) -> tuple[str, ...]:
    """The criteria ``spec`` can select by: :data:`CRITERIA`, its transforms, :data:`JOINT`."""
    return (*CRITERIA, *spec.evaluated, JOINT)


def select_model(
    spec: StudySpec, criterion: str = "downstream", optimizer: str | None = None
) -> SelectedModel:
    """The model ``criterion`` selects among the complete runs of ``spec``.

    The configuration is the study's (best mean final value over seeds, :func:`select_lr`);
    with several optimizers the best configuration over all of them, unless ``optimizer`` names
    one. A single model is the seed with the best final value of the same metric. Raises
    ``ValueError`` for an unknown criterion or optimizer, or when a run is not complete.
    """
    if criterion not in criteria(spec):
        raise ValueError(
            f"unknown criterion {criterion!r}; this study has {', '.join(criteria(spec))}"
        )
    if optimizer is not None and optimizer not in spec.optimizer_labels:
        labels = ", ".join(spec.optimizer_labels)
        raise ValueError(f"optimizer {optimizer!r} is not in the study ({labels})")
    task = spec.make_task()
    primary = task.primary_metric
    higher = task.higher_is_better[primary]
    finals, ensembles = _stored(spec)
    summaries = with_ensembles(summarize(finals), ensembles)
    if criterion == JOINT:
        choices = deploy_choices(summaries, deploy_criteria(spec, primary), primary, higher)
        joint = [c.picks[JOINT] for name, c in choices.items() if optimizer in (None, name)]
        pick = best_pick(joint, "val", primary, higher)
        best, prefix, better = pick.summary, pick.prefix, higher
        kind = prefix.removesuffix("_") or "base"
        metric = f"{prefix}val_{primary}"
    else:
        kind = criterion if criterion not in CRITERIA else "base"
        prefix = "" if kind == "base" else f"{kind}_"
        metric = "val_loss" if criterion == "val_loss" else f"{prefix}val_{primary}"
        better = higher and criterion != "val_loss"
        chosen = select_lr(summaries, metric, higher_is_better=better)
        candidates = [chosen[optimizer]] if optimizer is not None else list(chosen.values())
        best = min(candidates, key=lambda s: rank_key(s.mean.get(metric, math.nan), better))
    if kind in spec.ensembles:
        values = ensembles[(best.optimizer, best.lr)]
        run_ids = tuple(spec.run_id(best.optimizer, best.lr, s) for s in range(spec.grid_seeds))
        tests = {name: v[-1] for name, v in values.items() if name.startswith(f"{kind}_test_")}
    else:
        runs = [finals[(best.optimizer, best.lr, s)] for s in range(spec.grid_seeds)]
        seed = min(
            range(spec.grid_seeds), key=lambda s: rank_key(runs[s].get(metric, math.nan), better)
        )
        run_ids = (spec.run_id(best.optimizer, best.lr, seed),)
        tests = {
            name: value
            for name, value in finals[(best.optimizer, best.lr, seed)].items()
            if name.startswith(f"{prefix}test_")
        }
    stored = {name.removeprefix(f"{prefix}test_"): value for name, value in tests.items()}
    return SelectedModel(criterion, metric, best.optimizer, best.lr, kind, run_ids, stored)


def _stored(
    spec: StudySpec,
) -> tuple[dict[tuple[str, float, int], dict[str, float]], dict[tuple[str, float], Any]]:
    """Final metrics of every run of ``spec`` and the curves of its ensembles, from the store;
    ``ValueError`` if a run or an ensemble is not complete (run the study first)."""
    with ResultsStore(spec.out / STORE_NAME, readonly=True) as store:
        ids = [spec.run_id(*key) for key in spec.grid()]
        ids += [spec.ensemble_id(*config) for config in grid_configs(spec) if spec.ensembles]
        missing = [run_id for run_id in ids if not store.is_complete(run_id)]
        if missing:
            raise ValueError(
                f"{len(missing)} runs of {spec.name} are not complete in {spec.out}, e.g. "
                f"{missing[0]}: run the study first"
            )
        finals = {
            key: {n: v[-1] for n, v in store.curves(spec.run_id(*key)).items() if n != "epoch"}
            for key in spec.grid()
        }
        ensembles = {
            config: store.curves(spec.ensemble_id(*config))
            for config in grid_configs(spec)
            if spec.ensembles
        }
    return finals, ensembles


def selected_module(spec: StudySpec, selected: SelectedModel) -> nn.Module:
    """The model of ``selected`` rebuilt from its runs' checkpoints."""
    seeds = {spec.run_id(selected.optimizer, selected.lr, s): s for s in range(spec.grid_seeds)}
    jobs = [run_job(spec, selected.optimizer, selected.lr, seeds[i]) for i in selected.run_ids]
    if selected.kind in spec.ensembles:
        plain = selected.kind.removesuffix("_ts")
        member_kind = plain.removesuffix("ens").removesuffix("_") or "base"
        members = [rebuild(job, member_kind) for job in jobs]
        scale = partial(calibrated, spec.make_task()) if plain != selected.kind else None
        return ensemble_of(members, scale)
    return rebuild(jobs[0], selected.kind)


def _structure(task: Task, kind: str, members: int | None) -> nn.Module:
    """An untrained model shaped like an exported ``kind``: ``task.make_model()``, an
    :class:`OutputEnsemble` of ``members`` of them, and for a temperature-scaled kind
    (``..._ts``) each member and the whole wrapped in :class:`TemperatureScaled`; loading the
    exported ``state_dict`` sets the weights and the temperatures."""
    scaled = kind == "ts" or kind.endswith("_ts")
    if members is None:
        model = task.make_model()
        return TemperatureScaled(model) if scaled else model
    parts = [task.make_model() for _ in range(members)]
    return ensemble_of(parts, TemperatureScaled if scaled else None)


def export_model(
    spec: StudySpec,
    path: str | os.PathLike[str],
    criterion: str = "downstream",
    optimizer: str | None = None,
) -> SelectedModel:
    """Select (:func:`select_model`), rebuild and write the model to ``path`` (atomically).

    The file is a ``torch.save`` dict: ``format``, ``task``, ``size``, ``data_seed``,
    ``members`` (``None`` for a single model, else the ensemble size), ``state_dict`` and
    ``selected`` (the :class:`SelectedModel` fields); read it with :func:`load_model`.
    """
    selected = select_model(spec, criterion, optimizer)
    module = selected_module(spec, selected)
    payload = {
        "format": FORMAT_VERSION,
        "task": spec.task,
        "size": spec.size,
        "data_seed": DATA_SEED,
        "members": _ensemble_size(module),
        "state_dict": module.state_dict(),
        "selected": {
            **{name: getattr(selected, name) for name in ("criterion", "metric", "optimizer")},
            "lr": selected.lr,
            "kind": selected.kind,
            "run_ids": list(selected.run_ids),
            "stored": dict(selected.stored),
        },
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, target)
    return selected


def _ensemble_size(module: nn.Module) -> int | None:
    """Members of an (optionally temperature-scaled) ensemble; ``None`` for a single model."""
    inner = module.model if isinstance(module, TemperatureScaled) else module
    return len(inner.members) if isinstance(inner, OutputEnsemble) else None


def load_model(path: str | os.PathLike[str]) -> tuple[Task, nn.Module, dict[str, Any]]:
    """The task, the model and the file's ``selected`` record of an exported model.

    The model is ``task.make_model()`` (an ensemble: an :class:`OutputEnsemble` of them) with
    the exported weights loaded; nothing else is needed to deploy it with ``task.evaluate``.
    """
    payload = torch.load(path, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an exported beyondloss model (format {FORMAT_VERSION})")
    task = task_factory(payload["task"])(payload["size"], payload["data_seed"])
    model = _structure(task, payload["selected"]["kind"], payload["members"])
    model.load_state_dict(payload["state_dict"])
    return task, model, payload["selected"]
