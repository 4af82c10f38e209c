"""DoPr-X − X under a study's protocol, with each arm's model chosen on validation.

Usage: the options of the study that ran, after ``study``::

    python experiments/protocol_gains.py study bc-pendulum --size full --epochs 50 \\
        --schedule cosine --warmup 0.05 --transforms ema --ema-decays 0.99,0.999 \\
        --optimizers adamw,dopr-adamw,muon,dopr-muon --lrs 3e-4,1e-3,3e-3 --out runs

For each optimizer and each *criterion* below, the candidate models are selected by their mean
validation primary metric over seeds; seed ``s`` of DoPr-X's choice is then paired with seed
``s`` of X's choice on the test primary metric (``beyondloss.selection.statistics.paired_gain``:
mean ± 95 % t half-width, exact sign-flip p), and each arm's mean val loss is shown beside it
(the one-step fit of the chosen configuration's base model).

* ``base, final``: the raw final iterate, lr by its val metric (today's protocol).
* ``base, epoch by val``: each run's checkpoint with the best val metric, lr by that value.
* ``EMA, final``: the per-step EMA at the final epoch, lr × decay by val (the DoPr paper's
  evaluation copy; decays from ``--ema-decays``, the same grid for every optimizer).
* ``EMA, epoch by val``: the same over each run's evaluated epochs.

Nothing is trained: it reads the study's runs from the store (every run must be complete).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np

from beyondloss.cli import build_parser, study_fields
from beyondloss.selection.configs import rank_key
from beyondloss.selection.statistics import mean_ci, paired_gain
from beyondloss.store import ResultsStore
from beyondloss.study.report import dopr_pairs, format_lr
from beyondloss.study.ttf import STORE_NAME, StudySpec, run_finals

Candidate = tuple[float, str]
"""``(lr, model prefix)``: ``""`` for the base model, ``"ema0.999_"`` for an EMA."""


def _values(spec: StudySpec) -> dict[tuple[str, float, int], dict[str, float]]:
    """Each run's final metrics and its epoch-selected ones (``...@best``), as the study's
    report computes them (:func:`beyondloss.study.ttf.run_finals`)."""
    task = spec.make_task()
    out = {}
    with ResultsStore(spec.out / STORE_NAME) as store:
        for key in spec.grid():
            run_id = spec.run_id(*key)
            if not store.is_complete(run_id):
                raise SystemExit(f"run {run_id} is not complete; run the study first")
            out[key] = run_finals(spec, task, store.curves(run_id))
    return out


def _choose(
    spec: StudySpec,
    values: dict[tuple[str, float, int], dict[str, float]],
    optimizer: str,
    prefixes: Sequence[str],
    suffix: str,
    metric: str,
    higher: bool,
) -> Candidate:
    """The (lr, prefix) with the best mean val metric over seeds."""
    seeds = range(spec.grid_seeds)

    def mean_val(candidate: Candidate) -> float:
        lr, prefix = candidate
        vals = [values[(optimizer, lr, s)].get(f"{prefix}val_{metric}{suffix}", math.nan)
                for s in seeds]  # fmt: skip
        return float(np.mean(vals))

    candidates = [(lr, prefix) for lr in spec.grid_lrs for prefix in prefixes]
    return min(candidates, key=lambda c: rank_key(mean_val(c), higher))


def main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    spec = StudySpec(task=args.task, size=args.size, **study_fields(args))
    task = spec.make_task()
    metric = task.primary_metric
    higher = task.higher_is_better[metric]
    values = _values(spec)
    emas = [f"{name}_" for name in spec.weight_transforms if name.startswith("ema")]
    criteria = {
        "base, final": ([""], ""),
        "base, epoch by val": ([""], "@best"),
    }
    if emas:
        criteria |= {"EMA, final": (emas, ""), "EMA, epoch by val": (emas, "@best")}
    print(f"Study {spec.name}: {len(values)} runs, seeds 0–{spec.grid_seeds - 1}; test {metric}")
    print()
    print("| criterion | pair | DoPr choice | base choice | DoPr test | base test | "
          "gain (DoPr − base) | p | val loss DoPr / base |")  # fmt: skip
    print("|---|---|---|---|--:|--:|--:|--:|--:|")
    seeds = range(spec.grid_seeds)
    for label, (prefixes, suffix) in criteria.items():
        for dopr, base in dopr_pairs(spec.optimizers):
            chosen = {
                name: _choose(spec, values, name, prefixes, suffix, metric, higher)
                for name in (dopr, base)
            }
            tests = {}
            losses = {}
            for name, (lr, prefix) in chosen.items():
                tests[name] = [values[(name, lr, s)][f"{prefix}test_{metric}{suffix}"]
                               for s in seeds]  # fmt: skip
                losses[name] = float(np.mean([values[(name, lr, s)]["val_loss"] for s in seeds]))
            gain = paired_gain(tests[dopr], tests[base], higher)
            cells = [
                label,
                f"{dopr} vs {base}",
                *(f"{format_lr(lr)} {(p.removesuffix('_') or 'base')}" for lr, p in
                  (chosen[dopr], chosen[base])),  # fmt: skip
                *(f"{mean_ci(tests[name]).mean:.3f}" for name in (dopr, base)),
                f"{gain.mean:+.3f} ± {gain.half_width:.3f}",
                f"{gain.p_value:.3g}",
                f"{losses[dopr]:.3g} / {losses[base]:.3g}",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
