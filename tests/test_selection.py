"""Naive vs post-hoc selection, reversal and loss–error mismatch on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beyondloss.posthoc.ensemble import Composition
from beyondloss.posthoc.tracker import PosthocLog
from beyondloss.selection.configs import Summary, deploy_choices
from beyondloss.selection.curves import CurveBook
from beyondloss.selection.posthoc import choose, compare_selection, config_reversal
from beyondloss.selection.reversal import (
    loss_error_mismatch,
    reversal_report,
    reversal_table,
)

N, C = 200, 3


def test_choose_takes_each_runs_first_minimum_and_the_config_with_the_best_mean() -> None:
    choice = choose(
        {
            "a": [[3.0, 1.0, 2.0, 1.0], [2.0, 2.0, 1.5, 3.0]],  # minima 1.0 @1, 1.5 @2: mean 1.25
            "b": [[2.0, 1.9, 1.2, 1.1], [1.4, 1.3, 1.3, 1.6]],  # minima 1.1 @3, 1.3 @1: mean 1.2
        }
    )
    assert (choice.config, choice.indices, choice.score) == ("b", (3, 1), pytest.approx(1.2))
    assert choose({"ens": [[2.0, 1.0, 1.0]]}).indices == (1,)


def test_reversal_is_found_in_a_constructed_case() -> None:
    report = reversal_report([3, 2, 1, 2, 3], [5, 4, 3, 2, 1], labels=[10, 20, 30, 40, 50])
    # Pairs with opposite orders: (20,50), (30,40), (30,50), (40,50); (30,50) is the largest.
    assert report.n_reversed == 4 and report.n_pairs == 10
    assert (report.largest.first, report.largest.second, report.largest.size) == (30, 50, 2.0)
    assert (report.base_best, report.posthoc_best, report.regret) == (30, 50, 2.0)
    assert reversal_report([3, 2, 1, 2, 3], [5, 4, 3, 2, 1], tol=1.5).n_reversed == 1


def test_no_reversal_on_monotone_curves() -> None:
    report = reversal_report([5.0, 4.0, 3.0, 2.0], [2.0, 1.5, 1.2, 1.1])
    assert report.n_reversed == 0 and report.largest is None
    assert report.base_best == report.posthoc_best == 3 and report.regret == 0.0


def test_loss_error_mismatch_after_the_nll_minimum() -> None:
    found = loss_error_mismatch([3.0, 2.0, 1.0, 1.5, 2.0], [0.5, 0.4, 0.3, 0.25, 0.2])
    assert (found.nll_best, found.error_best, found.mismatch) == (2, 4, True)
    assert found.nll_rise == pytest.approx(1.0) and found.error_drop == pytest.approx(0.1)
    assert (found.n_mismatched_steps, found.n_steps_after) == (2, 2)
    aligned = loss_error_mismatch([3.0, 2.0, 1.0], [0.5, 0.4, 0.3])
    assert not aligned.mismatch and aligned.n_steps_after == 0


def _log(scales: list[float], accuracy: list[float], seed: int) -> PosthocLog:
    """Logits ``s_e · onehot(prediction)`` whose accuracy grows along epochs while the scale
    ``s_e`` grows too: base NLL overfits, temperature-scaled NLL keeps improving."""
    generator = torch.Generator().manual_seed(seed)
    labels = {s: torch.arange(N) % C for s in ("val", "test")}
    log = PosthocLog(["base"], labels, {})
    order = torch.randperm(N, generator=generator)
    for epoch, (scale, acc) in enumerate(zip(scales, accuracy, strict=True), start=1):
        logits = {}
        for split, y in labels.items():
            prediction = torch.where(order < acc * N, y, (y + 1) % C)
            noise = 0.1 * torch.randn(N, C, generator=generator)
            logits[("base", split)] = scale * torch.nn.functional.one_hot(prediction, C) + noise
        log.append(epoch, logits)
    return log


def _overfitting_runs() -> list[PosthocLog]:
    return [_log([1.0, 3.0, 6.0, 10.0], [0.5, 0.6, 0.7, 0.8], seed) for seed in (0, 1)]


def test_post_hoc_selection_picks_later_epochs_than_naive_selection() -> None:
    rows = {r["transform"]: r for r in compare_selection(_overfitting_runs())}
    assert list(rows) == ["base", "TS", "Ens", "Ens+TS"]
    assert rows["base"]["epochs_naive"] == rows["base"]["epochs_posthoc"] == (1, 1)
    assert rows["base"]["test_nll_gain"] == 0.0
    assert rows["TS"]["epochs_naive"] == (1, 1) and rows["TS"]["epochs_posthoc"] == (4, 4)
    assert rows["TS"]["test_error_gain"] == pytest.approx(0.3, abs=0.02)
    assert rows["Ens+TS"]["epochs_posthoc"] == (4, 4)
    assert rows["Ens+TS"]["test_nll_gain"] > 0


def test_reversal_table_reports_the_overfitting_runs() -> None:
    runs = _overfitting_runs()
    book = CurveBook({"default": runs})
    transforms = (Composition(), Composition(final_ts=True))
    curves = {c.name: book.curves("default", c) for c in transforms}
    rows = {r["transform"]: r for r in reversal_table(curves)}
    assert (rows["TS"]["base_best"], rows["TS"]["posthoc_best"]) == (1, 4)
    assert rows["TS"]["n_reversed"] == 6 and rows["TS"]["regret"] > 0
    assert rows["base"]["mismatch_mismatch"] and not rows["TS"]["mismatch_mismatch"]
    assert np.array_equal(curves["TS"].epochs, [1, 2, 3, 4])


def test_grid_selection_and_reversal_over_configs() -> None:
    flat = [_log([1.0] * 4, [0.55] * 4, seed) for seed in (0, 1)]
    grid = {"overfits": _overfitting_runs(), "flat": flat}
    book = CurveBook(grid)
    rows = {r["transform"]: r for r in compare_selection(grid, book=book)}
    assert rows["TS"]["config_naive"] == "flat" and rows["TS"]["config_posthoc"] == "overfits"
    assert rows["TS"]["test_error_gain"] > 0.2
    reversal = config_reversal(book, Composition(final_ts=True))
    assert reversal["n_reversed"] == 1
    assert (reversal["base_best"], reversal["posthoc_best"]) == ("flat", "overfits")


def test_deploy_choices_pick_per_criterion_and_measure_regret_against_the_test_oracle() -> None:
    def summary(lr: float, **mean: float) -> Summary:
        return Summary("adamw", lr, 3, mean, {k: 0.0 for k in mean})

    # lr 1e-3 has the lower val loss; lr 1e-2 the better downstream val metric; SWA at 1e-3
    # is best on val, but the oracle on test is SWA at 1e-2.
    summaries = [
        summary(1e-3, val_loss=0.1, val_acc=0.5, test_acc=0.5, swa_val_acc=0.9, swa_test_acc=0.7),
        summary(1e-2, val_loss=0.2, val_acc=0.6, test_acc=0.65, swa_val_acc=0.8, swa_test_acc=0.8),
    ]
    criteria = {
        "val loss": ("val_loss", ""),
        "downstream": ("val_acc", ""),
        "SWA": ("swa_val_acc", "swa_"),
    }
    choice = deploy_choices(summaries, criteria, "acc", higher_is_better=True)["adamw"]
    assert {name: pick.summary.lr for name, pick in choice.picks.items()} == {
        "val loss": 1e-3,
        "downstream": 1e-2,
        "SWA": 1e-3,
        "joint": 1e-3,
    }
    assert choice.picks["joint"].prefix == "swa_" and choice.oracle.prefix == "swa_"
    assert choice.oracle.summary.lr == 1e-2
    assert choice.regret == pytest.approx(
        {"val loss": 0.3, "downstream": 0.15, "SWA": 0.1, "joint": 0.1}
    )
