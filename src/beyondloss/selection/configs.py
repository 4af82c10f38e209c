"""Selecting a configuration, and the model to deploy, from final-epoch metrics over seeds.

A *configuration* is an ``(optimizer, lr)`` pair; its runs differ by seed only. ``finals`` maps
``(optimizer, lr, seed)`` to a run's final-epoch metrics. A *model* of a configuration is its
base model or one of its post-hoc transforms, whose metrics carry the transform's prefix
(``swa_val_vpt``; an ensemble over seeds, ``ens_``, is one model per configuration).

Criteria (each picks on validation, each is reported on test):

* **val loss**: the configuration with the lowest mean one-step ``val_loss`` (standard
  practice, the naive criterion);
* **downstream**: the best mean ``val_<primary>``, the deployed metric on val;
* **post-hoc** ``T``: the best mean ``T_val_<primary>`` of transform ``T``;
* **joint**: the best validation metric over configurations × models.

The *regret* of a criterion is ``|test(oracle) − test(choice)|``, where the oracle is the best
test metric over configurations × models of the same optimizer: what choosing on validation
cost against choosing on test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from beyondloss.selection.statistics import mean_ci

RunKey = tuple[str, float, int]
"""``(optimizer, lr, seed)`` of one run."""


@dataclass(frozen=True)
class Summary:
    """Final-epoch metrics of one configuration over its seeds.

    ``mean[m]`` and ``std[m]`` are the mean and sample standard deviation (``ddof=1``; NaN when
    ``n = 1``) of metric ``m`` over the ``n`` seeds; ``half_width[m]`` is the half-width of the
    Student-t interval of the mean at :data:`~beyondloss.selection.statistics.CI_LEVEL`,
    ``t_{(1+level)/2, n−1} · std / √n`` (see :func:`~beyondloss.selection.statistics.mean_ci`).
    A non-finite value in any seed (a diverged run) makes the mean non-finite and the spreads
    NaN.
    """

    optimizer: str
    lr: float
    n: int
    mean: Mapping[str, float]
    std: Mapping[str, float]
    half_width: Mapping[str, float] = field(default_factory=dict)


def summarize(finals: Mapping[RunKey, Mapping[str, float]]) -> list[Summary]:
    """One :class:`Summary` per configuration of ``{(optimizer, lr, seed): final metrics}``.

    Configurations come out in first-appearance order of ``finals``; a metric enters a summary
    only if every seed of that configuration has it.
    """
    groups: dict[tuple[str, float], list[Mapping[str, float]]] = {}
    for (optimizer, lr, _seed), metrics in finals.items():
        groups.setdefault((optimizer, lr), []).append(metrics)
    summaries = []
    for (optimizer, lr), rows in groups.items():
        names = [name for name in rows[0] if all(name in row for row in rows)]
        mean, std, half_width = {}, {}, {}
        for name in names:
            values = np.array([row[name] for row in rows], dtype=np.float64)
            interval = mean_ci(values)
            mean[name], half_width[name] = interval.mean, interval.half_width
            with np.errstate(invalid="ignore"):
                std[name] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        summaries.append(Summary(optimizer, lr, len(rows), mean, std, half_width))
    return summaries


def rank_key(value: float, higher_is_better: bool) -> float:
    """Sort key of a metric value, best first and NaN (a diverged or missing run) last."""
    if math.isnan(value):
        return math.inf
    return -value if higher_is_better else value


def select_lr(
    summaries: Sequence[Summary], metric: str, higher_is_better: bool = False
) -> dict[str, Summary]:
    """For each optimizer, its configuration with the best mean ``metric`` over seeds.

    A NaN or missing mean (every seed diverged before the metric was evaluated) ranks last.
    Ties go to the configuration listed first. Optimizers appear in first-appearance order of
    ``summaries``.
    """

    def rank(summary: Summary) -> float:
        return rank_key(summary.mean.get(metric, math.nan), higher_is_better)

    best: dict[str, Summary] = {}
    for summary in summaries:
        incumbent = best.get(summary.optimizer)
        if incumbent is None or rank(summary) < rank(incumbent):
            best[summary.optimizer] = summary
    return best


@dataclass(frozen=True)
class Pick:
    """A model chosen by one criterion: its configuration's summary and the model's prefix
    (``""`` for the base model, ``"swa_"``, ``"ens_"``, ...)."""

    criterion: str
    summary: Summary
    prefix: str

    def test(self, primary: str) -> float:
        """The chosen model's mean test ``primary`` metric (NaN if missing)."""
        return self.summary.mean.get(f"{self.prefix}test_{primary}", math.nan)


@dataclass(frozen=True)
class DeployChoice:
    """What each criterion deploys for one optimizer (see the module docstring).

    ``picks`` holds one :class:`Pick` per criterion, in the order given, then ``"joint"``;
    ``oracle`` is the best model on test; ``regret[c]`` is ``|test(oracle) − test(picks[c])|``.
    """

    picks: Mapping[str, Pick]
    oracle: Pick
    regret: Mapping[str, float]


def deploy_choices(
    summaries: Sequence[Summary],
    criteria: Mapping[str, tuple[str, str]],
    primary: str,
    higher_is_better: bool,
) -> dict[str, DeployChoice]:
    """Per optimizer, the model each criterion deploys, the joint choice and the test oracle.

    ``criteria`` maps a criterion's name to ``(validation metric, model prefix)``: the model
    with that prefix, at the configuration with the best mean validation metric (val loss is
    lower-is-better, every other metric follows ``higher_is_better``). The joint choice and the
    oracle range over the models of every criterion but ``val_loss``'s (which selects the base
    model, as does the downstream criterion).
    """
    out: dict[str, DeployChoice] = {}
    for optimizer in dict.fromkeys(s.optimizer for s in summaries):
        own = [s for s in summaries if s.optimizer == optimizer]
        picks = {}
        for name, (metric, prefix) in criteria.items():
            better = higher_is_better and metric != "val_loss"
            picks[name] = Pick(name, select_lr(own, metric, better)[optimizer], prefix)
        models = dict.fromkeys(p for m, p in criteria.values() if m != "val_loss")
        options = [Pick("joint", s, p) for p in models for s in own]

        picks["joint"] = best_pick(options, "val", primary, higher_is_better)
        oracle = best_pick(options, "test", primary, higher_is_better)
        regret = {name: abs(oracle.test(primary) - p.test(primary)) for name, p in picks.items()}
        out[optimizer] = DeployChoice(picks, oracle, regret)
    return out


def best_pick(options: Sequence[Pick], split: str, primary: str, higher_is_better: bool) -> Pick:
    """The option with the best mean ``<prefix><split>_<primary>`` (first on ties, NaN last)."""
    return min(
        options,
        key=lambda o: rank_key(
            o.summary.mean.get(f"{o.prefix}{split}_{primary}", math.nan), higher_is_better
        ),
    )
