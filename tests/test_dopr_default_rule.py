"""The pre-registered default rule of docs/dopr-defaults.md (experiments/dopr_default_rule.py) on
hand-made runs: each base at its best weight decay, the worst relative validation gain as a
candidate's score, the 0.01 margin before the default is replaced, and refusals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).parents[1] / "experiments" / "dopr_default_rule.py"
_spec = importlib.util.spec_from_file_location("dopr_default_rule", SCRIPT)
rule = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rule  # its dataclass resolves annotations through the module
_spec.loader.exec_module(rule)  # type: ignore[union-attr]

TASK = "bc-reacher"  # success_rate, higher is better
LR = rule.LEARNING_RATES[TASK]


def runs(base_val: dict[str, dict[float, float]], dopr_val: dict[str, dict[float, float]]):
    """Final rows, 5 seeds each, whose val (and test) success rate is the given mean."""
    rows = []
    for base, by_decay in base_val.items():
        for wd, value in by_decay.items():
            rows += [
                dict(
                    task=TASK,
                    optimizer=base,
                    lr=LR[base],
                    weight_decay=wd,
                    damping=float("nan"),
                    seed=s,
                    run_id=f"{base}-{wd}-{s}",
                    val_success_rate=value,
                    test_success_rate=value,
                )
                for s in range(rule.SEEDS)
            ]
    for base, by_damping in dopr_val.items():
        for c, value in by_damping.items():
            rows += [
                dict(
                    task=TASK,
                    optimizer=f"dopr-{base}",
                    lr=LR["dopr"],
                    weight_decay=0.0,
                    damping=c,
                    seed=s,
                    run_id=f"dopr-{base}-{c}-{s}",
                    val_success_rate=value,
                    test_success_rate=value,
                )
                for s in range(rule.SEEDS)
            ]
    return pd.DataFrame(rows)


BASES = {
    "adamw": {0.0: 0.5, 1e-4: 0.5, 1e-3: 0.8, 1e-2: 0.6},  # best weight decay: 1e-3
    "muon": dict.fromkeys(rule.WEIGHT_DECAYS, 0.5),
}


def test_the_score_is_the_worst_relative_gain_over_each_base_at_its_best_weight_decay() -> None:
    dopr = {
        "adamw": {1e-3: 0.4, 1e-2: 0.8, 0.1: 0.88, 0.2: 0.2},
        "muon": {1e-3: 0.6, 1e-2: 0.6, 0.1: 0.5, 0.2: 0.9},
    }
    decision = rule.decide(runs(BASES, dopr), [TASK])
    assert decision.best_decay == {(TASK, "adamw"): 1e-3, (TASK, "muon"): 0.0}
    assert decision.gains[TASK, "adamw"][1e-3] == pytest.approx((0.4 - 0.8) / 0.8)
    assert decision.scores == pytest.approx({1e-3: -0.5, 1e-2: 0.0, 0.1: 0.0, 0.2: -0.75})
    assert decision.chosen == 1e-2  # the first of the tied best, 0.5 above the default


def test_the_default_stays_unless_another_candidate_wins_by_more_than_the_margin() -> None:
    bases = {"adamw": dict.fromkeys(rule.WEIGHT_DECAYS, 1.0), "muon": BASES["muon"]}
    dopr = {
        "adamw": {1e-3: 1.0, 1e-2: 1.009, 0.1: 1.0, 0.2: 1.0},
        "muon": {c: 0.6 for c in rule.CANDIDATES},
    }
    decision = rule.decide(runs(bases, dopr), [TASK])
    assert decision.scores[1e-2] - decision.scores[1e-3] == pytest.approx(0.009)
    assert decision.chosen == 1e-3


def test_a_missing_seed_or_a_seed_with_several_runs_is_refused() -> None:
    dopr = {base: {c: 0.5 for c in rule.CANDIDATES} for base in ("adamw", "muon")}
    complete = runs(BASES, dopr)
    with pytest.raises(LookupError, match=r"seeds \[4\] missing"):
        rule.decide(complete[complete["run_id"] != "dopr-muon-0.1-4"], [TASK])
    no_candidate = complete[~complete["run_id"].str.startswith("dopr-muon-0.1-")]
    with pytest.raises(LookupError, match=r"damping 0.1: seeds \[0, 1, 2, 3, 4\] missing"):
        rule.decide(no_candidate, [TASK], reselect_lr=True)
    other_scope = complete[complete["optimizer"] == "dopr-adamw"].assign(
        run_id=lambda frame: frame["run_id"] + "-hidden"
    )
    with pytest.raises(LookupError, match="several runs per seed"):
        rule.decide(pd.concat([complete, other_scope]), [TASK])


def test_the_learning_rate_check_lets_each_dopr_configuration_take_its_best_validation_lr() -> None:
    dopr = {base: {c: 0.5 for c in rule.CANDIDATES} for base in ("adamw", "muon")}
    at_rule_lr = runs(BASES, dopr)
    other_lr = at_rule_lr[at_rule_lr["optimizer"].str.startswith("dopr-")].assign(
        lr=1e-4, run_id=lambda frame: frame["run_id"] + "-other-lr"
    )
    better = (other_lr["optimizer"] == "dopr-adamw") & (other_lr["damping"] == 0.1)
    other_lr.loc[better, ["val_success_rate", "test_success_rate"]] = 0.8
    worse = other_lr["optimizer"] == "dopr-muon"
    other_lr.loc[worse, ["val_success_rate", "test_success_rate"]] = 0.1
    both = pd.concat([at_rule_lr, other_lr])

    fixed = rule.decide(both, [TASK])  # the rule itself reads only the rule's learning rates
    assert fixed.gains[TASK, "adamw"][0.1] == pytest.approx((0.5 - 0.8) / 0.8)
    checked = rule.decide(both, [TASK], reselect_lr=True)
    assert checked.dopr_lr[TASK, "adamw"][0.1] == 1e-4
    assert checked.gains[TASK, "adamw"][0.1] == pytest.approx(0.0)
    assert checked.dopr_lr[TASK, "adamw"][1e-3] == LR["dopr"]  # a tie keeps the rule's lr
    assert checked.dopr_lr[TASK, "muon"] == dict.fromkeys(rule.CANDIDATES, LR["dopr"])
    assert checked.best_decay == fixed.best_decay  # the bases keep their learning rates
