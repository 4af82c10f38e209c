"""DoPr's default damping, chosen by the rule fixed in docs/dopr-defaults.md before the runs.

Candidates γ ∈ {1e-3 (the library default), 1e-2, 0.1, 0.2}; each base (AdamW, Muon) gets as
many configurations, weight decay ∈ {0, 1e-4, 1e-3, 1e-2}. Every run trains at its
(task, optimizer)'s validation-loss-selected learning rate of docs/ttf-full.md, full size,
seeds 0–4. For task t, base b and candidate c, with m the mean over seeds of the task's primary
downstream metric on the *validation* split and s = +1 where higher is better, −1 otherwise::

    r(t, b, c) = s · (m[DoPr-b, γ = c] − m[b, best wd]) / |m[b, best wd]|
    score(c)   = min over the 10 (t, b) of r(t, b, c)      (the worst relative gain)

where the best weight decay of b is the one of best mean validation metric.

The default becomes argmax score, and stays 1e-3 unless another candidate scores more than
:data:`MARGIN` above it. Only then is *test* looked at: the paired gain (by seed, 95 % t
interval, sign-flip p) of the chosen candidate and of the current default over each base at
its best weight decay.

The runs, one ``beyondloss study`` per line (any stores; pass each with ``--store``)::

    beyondloss study bc-reacher --size full --optimizers dopr-adamw,dopr-muon --lrs 1e-2 --damping G
    beyondloss study bc-reacher --size full --optimizers adamw,muon --lrs 3e-3 --weight-decay WD
    ...  (every task, G and WD: the learning rates are in :data:`LEARNING_RATES`)

    python experiments/dopr_default_rule.py --store runs/beyondloss.db

``--reselect-lr`` is a sensitivity check made after the decision, not part of the rule: each
DoPr configuration then takes, on each task, the learning rate of best mean validation metric
among those the stores hold (e.g. the rest of the study's grid), and the bases keep theirs.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from beyondloss.selection.statistics import paired_gain
from beyondloss.store import ResultsStore
from beyondloss.tasks import make_task

CANDIDATES = (1e-3, 1e-2, 0.1, 0.2)
"""DoPr damping γ candidates; the first is the library default."""

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
"""The bases' configurations: as many as DoPr's candidates."""

MARGIN = 0.01
"""How much higher than the default's another candidate's score must be to replace it."""

SEEDS = 5

LEARNING_RATES = {
    "lorenz": {"adamw": 3e-4, "muon": 3e-4, "dopr": 3e-4},
    "sort": {"adamw": 1e-3, "muon": 3e-3, "dopr": 1e-3},
    "flow-digits": {"adamw": 1e-3, "muon": 1e-3, "dopr": 3e-3},
    "bc-pendulum": {"adamw": 3e-3, "muon": 3e-3, "dopr": 1e-3},
    "bc-reacher": {"adamw": 3e-3, "muon": 3e-3, "dopr": 1e-2},
}
"""Validation-loss-selected learning rates at the default settings (docs/ttf-full.md); both
DoPr variants share one on every task."""

BASES = ("adamw", "muon")


def load(stores: Sequence[str]) -> pd.DataFrame:
    """The final row of every complete full-size run in ``stores``, with ``damping`` (NaN for
    the bases; DoPr runs at the default record none)."""
    frames = []
    for path in stores:
        with ResultsStore(path) as store:
            frames.append(store.final_frame(status="complete", size="full"))
    runs = pd.concat(frames, ignore_index=True).copy()  # one block per dtype, not per column
    damping = runs.get("dopr.damping", pd.Series(np.nan, index=runs.index))
    is_dopr = runs["optimizer"].str.startswith("dopr-")
    runs["damping"] = np.where(is_dopr, damping.fillna(CANDIDATES[0]), np.nan)
    return runs.drop_duplicates(subset="run_id")


def of_optimizer(
    runs: pd.DataFrame, task: str, optimizer: str, damping: float | None = None
) -> pd.Series:
    """Which of ``runs`` are ``optimizer``'s on ``task`` (at ``damping``, if given)."""
    keep = (runs["task"] == task) & (runs["optimizer"] == optimizer)
    if damping is not None:
        keep &= np.isclose(runs["damping"], damping)
    return keep


def arm(
    runs: pd.DataFrame,
    task: str,
    optimizer: str,
    *,
    weight_decay: float = 0.0,
    damping: float | None = None,
    lr: float | None = None,
) -> pd.DataFrame:
    """The runs of one configuration at ``lr`` (default: its rule learning rate), indexed by
    seed; raises if a seed of 0..SEEDS-1 is missing or has several runs (other DoPr settings
    in the store)."""
    if lr is None:
        lr = LEARNING_RATES[task]["dopr" if optimizer.startswith("dopr-") else optimizer]
    keep = (
        of_optimizer(runs, task, optimizer, damping)
        & np.isclose(runs["lr"], lr)
        & np.isclose(runs["weight_decay"], weight_decay)
    )
    chosen = runs[keep].set_index("seed").sort_index()
    setting = f"weight decay {weight_decay:g}" if damping is None else f"damping {damping:g}"
    missing = sorted(set(range(SEEDS)) - set(chosen.index))
    if missing:
        raise LookupError(f"{task} {optimizer} lr {lr:g} {setting}: seeds {missing} missing")
    if chosen.index.duplicated().any():  # e.g. ablation runs (another scope) in the same store
        raise LookupError(
            f"{task} {optimizer} lr {lr:g} {setting}: several runs per seed; pass stores that"
            " hold only the rule's runs"
        )
    return chosen.loc[list(range(SEEDS))]


@functools.cache  # the rule and the test table both ask; building a task is not free
def primary(task: str) -> tuple[str, bool]:
    """The task's primary downstream metric and whether higher is better."""
    probe = make_task(task, "quick")
    return probe.primary_metric, probe.higher_is_better[probe.primary_metric]


@dataclass(frozen=True)
class Decision:
    """The rule's outcome: ``gains[task, base][c]`` = r(task, base, c), ``scores[c]``, the
    ``chosen`` γ, ``best_decay[task, base]``, each base's weight decay of best mean
    validation metric, and ``dopr_lr[task, base][c]``, the learning rate of DoPr-base at γ = c."""

    gains: dict[tuple[str, str], dict[float, float]]
    scores: dict[float, float]
    chosen: float
    best_decay: dict[tuple[str, str], float]
    dopr_lr: dict[tuple[str, str], dict[float, float]]


def held_lrs(runs: pd.DataFrame, task: str, optimizer: str, damping: float) -> list[float]:
    """The learning rates at which ``runs`` hold DoPr ``optimizer`` at ``damping`` on ``task``,
    the rule's first (so that it wins a tie), then ascending."""
    keep = of_optimizer(runs, task, optimizer, damping)
    rule_lr = LEARNING_RATES[task]["dopr"]
    return sorted(runs.loc[keep, "lr"].unique(), key=lambda lr: (not np.isclose(lr, rule_lr), lr))


def decide(runs: pd.DataFrame, tasks: Sequence[str], *, reselect_lr: bool = False) -> Decision:
    """The rule (module docs) over ``tasks``; with ``reselect_lr``, the sensitivity check in
    which each DoPr configuration takes its learning rate of best mean validation metric among
    those ``runs`` hold."""
    gains: dict[tuple[str, str], dict[float, float]] = {}
    best_decay: dict[tuple[str, str], float] = {}
    dopr_lr: dict[tuple[str, str], dict[float, float]] = {}
    for task in tasks:
        metric, higher = primary(task)
        sign = 1.0 if higher else -1.0
        for base in BASES:
            val = {
                wd: arm(runs, task, base, weight_decay=wd)[f"val_{metric}"].mean()
                for wd in WEIGHT_DECAYS
            }
            best_decay[task, base] = max(val, key=lambda wd: sign * val[wd])
            reference = val[best_decay[task, base]]
            optimizer, rule_lr = f"dopr-{base}", LEARNING_RATES[task]["dopr"]
            dopr, dopr_lr[task, base] = {}, {}
            for c in CANDIDATES:
                # none stored: the rule's, which arm() refuses as missing
                lrs = (reselect_lr and held_lrs(runs, task, optimizer, c)) or [rule_lr]
                by_lr = {
                    lr: arm(runs, task, optimizer, damping=c, lr=lr)[f"val_{metric}"].mean()
                    for lr in lrs
                }
                lr = max(by_lr, key=lambda lr: sign * by_lr[lr])
                dopr[c] = by_lr[lr]
                dopr_lr[task, base][c] = lr
            gains[task, base] = {c: sign * (dopr[c] - reference) / abs(reference) for c in dopr}
    scores = {c: min(g[c] for g in gains.values()) for c in CANDIDATES}
    best = max(CANDIDATES, key=lambda c: scores[c])
    chosen = best if scores[best] > scores[CANDIDATES[0]] + MARGIN else CANDIDATES[0]
    return Decision(gains, scores, chosen, best_decay, dopr_lr)


def rule_table(decision: Decision) -> str:
    """Markdown: r(t, b, c) for every pair and candidate, then the scores."""
    header = "| task | base | best wd | " + " | ".join(f"γ = {c:g}" for c in CANDIDATES) + " |"
    lines = [header, "|---|---|--:|" + "--:|" * len(CANDIDATES)]
    for (task, base), gain in decision.gains.items():
        rule_lr = LEARNING_RATES[task]["dopr"]
        lrs = decision.dopr_lr[task, base]
        cells = " | ".join(
            f"{gain[c]:+.3f}" + ("" if np.isclose(lrs[c], rule_lr) else f" (lr {lrs[c]:g})")
            for c in CANDIDATES
        )
        lines.append(f"| {task} | {base} | {decision.best_decay[task, base]:g} | {cells} |")
    scores = " | ".join(f"**{decision.scores[c]:+.3f}**" for c in CANDIDATES)
    lines.append(f"| **score (min)** | | | {scores} |")
    return "\n".join(lines)


def test_table(
    runs: pd.DataFrame, decision: Decision, tasks: Sequence[str], shown: Sequence[float]
) -> str:
    """Markdown: test metric of each base at its best weight decay, and the paired test gain
    of DoPr at each γ of ``shown`` (positive = DoPr better)."""
    lines = [
        "| task | base (best wd) | base test | "
        + " | ".join(f"DoPr γ = {c:g}: test, gain (p)" for c in shown)
        + " |",
        "|---|---|--:|" + "--:|" * len(shown),
    ]
    for task in tasks:
        metric, higher = primary(task)
        for base in BASES:
            wd = decision.best_decay[task, base]
            base_test = arm(runs, task, base, weight_decay=wd)[f"test_{metric}"].to_numpy()
            cells = []
            for c in shown:
                lr = decision.dopr_lr[task, base][c]
                dopr = arm(runs, task, f"dopr-{base}", damping=c, lr=lr)
                dopr_test = dopr[f"test_{metric}"].to_numpy()
                gain = paired_gain(dopr_test, base_test, higher)
                interval = f"{gain.mean:+.3g} ± {gain.half_width:.2g} ({gain.p_value:.3g})"
                cells.append(f"{dopr_test.mean():.4g}, {interval}")
            head = f"| {task} ({metric}) | {base} ({wd:g}) | {base_test.mean():.4g} | "
            lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store", action="append", required=True, help="a results store (repeatable)"
    )
    parser.add_argument("--tasks", default=",".join(LEARNING_RATES), help="comma-separated")
    parser.add_argument(
        "--all-candidates",
        action="store_true",
        help="test gains of every candidate, not only the default and the chosen one",
    )
    parser.add_argument(
        "--reselect-lr",
        action="store_true",
        help="sensitivity check, not the rule: DoPr takes its best-val lr among those stored",
    )
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(LEARNING_RATES))
    if unknown:
        parser.error(f"no rule learning rates for {', '.join(unknown)}")
    runs = load(args.store)
    try:
        decision = decide(runs, tasks, reselect_lr=args.reselect_lr)
    except LookupError as error:
        raise SystemExit(f"error: incomplete: {error}") from None
    if args.reselect_lr:
        print("Sensitivity check, not the rule: DoPr at its best-val learning rate (shown where")
        print("it is not the rule's); the bases at theirs.\n")
    print("Relative validation gain r of DoPr-base over base (its best weight decay):\n")
    print(rule_table(decision))
    default, chosen = CANDIDATES[0], decision.chosen
    if args.reselect_lr:
        print(
            f"\nUnder this check the rule would {'keep' if chosen == default else 'pick'}"
            f" {chosen:g}.\n"
        )
    else:
        verdict = "stays" if chosen == default else "becomes"
        print(f"\nDecision: the default damping {verdict} {chosen:g}.\n")
    shown = CANDIDATES if args.all_candidates else sorted({default, chosen})
    print(test_table(runs, decision, tasks, shown))
    if not math.isfinite(decision.scores[chosen]):
        print("\n(a score is not finite: a metric mean is 0 or NaN)")


if __name__ == "__main__":
    main()
