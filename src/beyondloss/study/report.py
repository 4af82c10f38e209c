"""DoPr-vs-base comparisons, val-loss/downstream agreement, and the study's tables (markdown,
CSV) and plots.

Everything here works on metrics already read from the results store; nothing trains. A
*configuration* is an ``(optimizer, lr)`` pair; its runs differ by seed only. ``finals`` maps
``(optimizer, lr, seed)`` to a run's final-epoch metrics; ``curves`` maps it to the run's
per-epoch metrics in the store's layout (key ``"epoch"`` plus one aligned list per metric).
Summaries and the selection of configurations are in :mod:`beyondloss.selection.configs`,
the statistics in :mod:`beyondloss.selection.statistics`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from beyondloss.selection.configs import RunKey, Summary
from beyondloss.selection.statistics import (
    CI_LEVEL,
    Kendall,
    MeanTau,
    PairedGain,
    kendall_tau,
    mean_within_tau,
    paired_gain,
)

CI_LABEL = f"{CI_LEVEL:.0%} CI"
"""How the tables name the confidence interval, e.g. ``95% CI``."""


def format_lr(lr: float) -> str:
    """Learning rate as in run ids and tables: ``0.003``, ``0.0003``, ``1e-05``."""
    return f"{lr:g}"


def format_cell(summary: Summary, metric: str) -> str:
    """``mean ± CI half-width`` of ``metric`` (the mean alone where the half-width is NaN)."""
    mean = summary.mean.get(metric, math.nan)
    half_width = summary.half_width.get(metric, math.nan)
    if math.isnan(half_width):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {half_width:.3g}"


def _header(metric: str, higher_is_better: Mapping[str, bool]) -> str:
    """``metric ↑`` / ``metric ↓`` where the direction is known, else ``metric``."""
    if metric not in higher_is_better:
        return metric
    return f"{metric} {'↑' if higher_is_better[metric] else '↓'}"


def markdown_table(
    rows: Sequence[Summary], metrics: Sequence[str], higher_is_better: Mapping[str, bool]
) -> str:
    """GitHub markdown table: optimizer, lr, n, then ``mean ± CI half-width`` of each metric.

    The half-width is :attr:`Summary.half_width` (omitted where NaN, e.g. one seed). Metric
    headers carry ↑ or ↓ where ``higher_is_better`` knows the metric.
    """

    headers = [_header(metric, higher_is_better) for metric in metrics]
    lines = [
        "| " + " | ".join(["optimizer", "lr", "n", *headers]) + " |",
        "|" + "---|" * 3 + "--:|" * len(metrics),
    ]
    for summary in rows:
        cells = [summary.optimizer, format_lr(summary.lr), str(summary.n)]
        cells += [format_cell(summary, metric) for metric in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(
    path: Path,
    summaries: Sequence[Summary],
    metrics: Sequence[str],
    selections: Mapping[str, Mapping[str, Summary]],
) -> None:
    """Every configuration as one CSV row.

    Columns: ``optimizer, lr, n``, one boolean ``selected_by_<criterion>`` per entry of
    ``selections`` (``{criterion: {optimizer: selected summary}}``), then ``<metric>_mean``,
    ``<metric>_std`` (sample std over seeds) and ``<metric>_ci95`` (the CI half-width, named
    after :data:`~beyondloss.selection.statistics.CI_LEVEL`) for each metric.
    """
    ci = f"ci{CI_LEVEL * 100:g}"
    header = ["optimizer", "lr", "n", *(f"selected_by_{c}" for c in selections)]
    header += [f"{metric}_{stat}" for metric in metrics for stat in ("mean", "std", ci)]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for summary in summaries:
            row: list[object] = [summary.optimizer, repr(summary.lr), summary.n]
            row += [chosen.get(summary.optimizer) is summary for chosen in selections.values()]
            for metric in metrics:
                row += [
                    summary.mean.get(metric, math.nan),
                    summary.std.get(metric, math.nan),
                    summary.half_width.get(metric, math.nan),
                ]
            writer.writerow(row)


def plot_curves(
    path: Path,
    curves: Callable[[Summary], Sequence[Mapping[str, Sequence[float]]]],
    selected: Mapping[str, Summary],
    panels: Sequence[tuple[str, bool]],
    title: str,
) -> None:
    """One panel per ``(metric, log_scale)`` of ``panels``, one line per selected optimizer.

    ``curves(summary)`` gives the per-seed curves of that configuration (store layout: key
    ``"epoch"`` plus one list per metric, aligned). Each line is the mean over seeds against the
    epoch, with a band from the lowest to the highest seed: unlike mean ± std, it never leaves
    the range the metric can take (a rate below 0, a loss at or below 0 on a log axis). The
    figure is written with the Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.0), squeeze=False)
    for summary in selected.values():
        runs = curves(summary)
        epochs = np.asarray(runs[0]["epoch"])
        label = f"{summary.optimizer} (lr {format_lr(summary.lr)})"
        for axis, (metric, _log) in zip(axes[0], panels, strict=True):
            values = np.array(
                [run.get(metric, [math.nan] * len(epochs)) for run in runs], dtype=np.float64
            )
            (line,) = axis.plot(epochs, values.mean(axis=0), label=label)
            axis.fill_between(
                epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2
            )
    for axis, (metric, log_scale) in zip(axes[0], panels, strict=True):
        data = [np.asarray(line.get_ydata(), dtype=np.float64) for line in axis.get_lines()]
        if log_scale and any((np.isfinite(y) & (y > 0)).any() for y in data):
            axis.set_yscale("log")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    save_figure(figure, path, title)


def dopr_pairs(optimizers: Iterable[str]) -> list[tuple[str, str]]:
    """``(dopr-X, X)`` for every base ``X`` present together with ``dopr-X``, in base order."""
    names = list(optimizers)
    return [(f"dopr-{name}", name) for name in names if f"dopr-{name}" in names]


@dataclass(frozen=True)
class GainRow:
    """DoPr-X against X, each at the learning rate ``criterion`` selected for it.

    ``gains[m]`` is the :func:`~beyondloss.selection.statistics.paired_gain` of final metric ``m``
    over the ``pairs`` seeds both configurations ran, positive when DoPr is better.
    """

    dopr: Summary
    base: Summary
    criterion: str
    pairs: int
    gains: Mapping[str, PairedGain]


def paired_gains(
    finals: Mapping[RunKey, Mapping[str, float]],
    selections: Mapping[str, Mapping[str, Summary]],
    metrics: Sequence[str],
    higher_is_better: Mapping[str, bool],
) -> list[GainRow]:
    """One :class:`GainRow` per DoPr/base pair (:func:`dopr_pairs`) and selection criterion.

    ``selections`` is ``{criterion: {optimizer: selected summary}}``. Seed ``s`` of DoPr-X at
    its selected lr is paired with seed ``s`` of X at its own selected lr; a missing metric
    counts as non-finite (the pair is dropped from that metric's gain).
    """
    rows = []
    optimizers = dict.fromkeys(name for chosen in selections.values() for name in chosen)
    for dopr, base in dopr_pairs(optimizers):
        for criterion, chosen in selections.items():
            dopr_arm, base_arm = chosen[dopr], chosen[base]
            seeds = sorted(_seeds(finals, dopr_arm) & _seeds(finals, base_arm))
            gains = {
                metric: paired_gain(
                    _finals_of(finals, dopr_arm, metric, seeds),
                    _finals_of(finals, base_arm, metric, seeds),
                    higher_is_better[metric],
                )
                for metric in metrics
            }
            rows.append(GainRow(dopr_arm, base_arm, criterion, len(seeds), gains))
    return rows


def _seeds(finals: Mapping[RunKey, Mapping[str, float]], summary: Summary) -> set[int]:
    """Seeds of ``summary``'s configuration present in ``finals``."""
    return {s for (o, lr, s) in finals if (o, lr) == (summary.optimizer, summary.lr)}


def _finals_of(
    finals: Mapping[RunKey, Mapping[str, float]], summary: Summary, metric: str, seeds: list[int]
) -> list[float]:
    """Final ``metric`` of ``summary``'s configuration at each of ``seeds`` (NaN if missing)."""
    return [finals[(summary.optimizer, summary.lr, s)].get(metric, math.nan) for s in seeds]


def _difference(metric: str, higher_is_better: bool) -> str:
    """Header naming the oriented difference, e.g. ``test_vpt: DoPr − base``."""
    return f"{metric}: {'DoPr − base' if higher_is_better else 'base − DoPr'}"


def _gain_cell(gain: PairedGain, pairs: int) -> str:
    text = f"{gain.mean:+.3g}"
    if not math.isnan(gain.half_width):
        text += f" ± {gain.half_width:.2g}"
    if gain.n != pairs:
        text += f" (n={gain.n})"
    return text


def gains_table(
    rows: Sequence[GainRow], metrics: Sequence[str], higher_is_better: Mapping[str, bool]
) -> str:
    """GitHub markdown table of :class:`GainRow` s: the pair, the criterion, both learning rates,
    the number of seed pairs, then per metric ``gain ± CI half-width`` and its sign-flip p.

    A gain cell adds ``(n=k)`` when only ``k`` pairs had finite values.
    """
    header = ["DoPr vs base", "lr selected by", "lr DoPr / base", "seed pairs"]
    for metric in metrics:
        header += [_difference(metric, higher_is_better[metric]), "p"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 3 + "--:|" * (1 + 2 * len(metrics)),
    ]
    for row in rows:
        cells = [
            f"{row.dopr.optimizer} vs {row.base.optimizer}",
            row.criterion,
            f"{format_lr(row.dopr.lr)} / {format_lr(row.base.lr)}",
            str(row.pairs),
        ]
        for metric in metrics:
            gain = row.gains[metric]
            cells += [_gain_cell(gain, row.pairs), f"{gain.p_value:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_gains_csv(
    path: Path, rows: Sequence[GainRow], higher_is_better: Mapping[str, bool]
) -> None:
    """Every ``(pair, criterion, metric)`` of ``rows`` as one CSV row.

    Columns: ``dopr, base, criterion, dopr_lr, base_lr, metric, higher_is_better, gain,
    ci95, p_value, n, dropped``; ``gain`` is the mean paired difference, positive when DoPr
    is better, and ``ci95`` its half-width (named after the CI level).
    """
    header = ["dopr", "base", "criterion", "dopr_lr", "base_lr", "metric", "higher_is_better"]
    header += ["gain", f"ci{CI_LEVEL * 100:g}", "p_value", "n", "dropped"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row in rows:
            for metric, gain in row.gains.items():
                writer.writerow(
                    [
                        row.dopr.optimizer,
                        row.base.optimizer,
                        row.criterion,
                        repr(row.dopr.lr),
                        repr(row.base.lr),
                        metric,
                        higher_is_better[metric],
                        gain.mean,
                        gain.half_width,
                        gain.p_value,
                        gain.n,
                        gain.dropped,
                    ]
                )


@dataclass(frozen=True)
class Mismatch:
    """Agreement of ``val_loss`` with the downstream ``metric`` over a study's runs.

    ``checkpoints``: oriented Kendall τ over every ``(run, epoch)``; ``within``: its mean over
    configurations, each computed from that configuration's own checkpoints; ``final``: over
    the runs' last epochs, the checkpoints learning-rate selection compares. ``τ = +1`` means
    lower val loss ⇔ better metric (see :func:`~beyondloss.selection.statistics.kendall_tau`).
    """

    metric: str
    checkpoints: Kendall
    within: MeanTau
    final: Kendall


def mismatch(
    curves: Mapping[RunKey, Mapping[str, Sequence[float]]], metric: str, higher_is_better: bool
) -> Mismatch:
    """:class:`Mismatch` of ``val_loss`` against ``metric`` over all runs of ``curves``.

    A checkpoint or run missing either value (a diverged run's last epoch) is left out.
    """
    losses, values, groups, last_losses, last_values = [], [], [], [], []
    for (optimizer, lr, _seed), run in curves.items():
        loss = list(run.get("val_loss", []))
        metric_values = list(run.get(metric, [math.nan] * len(loss)))
        losses += loss
        values += metric_values
        groups += [(optimizer, lr)] * len(loss)
        if loss:
            last_losses.append(loss[-1])
            last_values.append(metric_values[-1])
    return Mismatch(
        metric,
        kendall_tau(losses, values, higher_is_better),
        mean_within_tau(losses, values, groups, higher_is_better),
        kendall_tau(last_losses, last_values, higher_is_better),
    )


def mismatch_table(rows: Sequence[Mismatch]) -> str:
    """GitHub markdown table: one row per downstream metric with the three oriented τ, their
    point counts, and scipy's p-value of the final-epoch τ (the pooled checkpoints of one run
    are not independent, so no p-value is given for them)."""
    lines = [
        "| downstream metric | τ, all checkpoints | checkpoints | mean τ within configurations "
        "| configurations | τ, final epochs | p | runs |",
        "|---|" + "--:|" * 7,
    ]
    for row in rows:
        cells = [
            row.metric,
            f"{row.checkpoints.tau:+.3f}",
            str(row.checkpoints.n),
            f"{row.within.tau:+.3f}",
            str(row.within.groups),
            f"{row.final.tau:+.3f}",
            f"{row.final.p_value:.3g}",
            str(row.final.n),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_mismatch(
    path: Path,
    curves: Mapping[RunKey, Mapping[str, Sequence[float]]],
    metric: str,
    title: str,
) -> None:
    """Scatter of every checkpoint: x = ``val_loss`` (log scale), y = ``metric``, one colour per
    optimizer. Checkpoints with a non-finite value, or a non-positive loss, are not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points: dict[str, tuple[list[float], list[float]]] = {}
    for (optimizer, _lr, _seed), run in curves.items():
        loss = list(run.get("val_loss", []))
        xs, ys = points.setdefault(optimizer, ([], []))
        xs += loss
        ys += list(run.get(metric, [math.nan] * len(loss)))
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    drawn = 0
    for optimizer, (xs, ys) in points.items():
        x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        shown = np.isfinite(x) & np.isfinite(y) & (x > 0)
        axis.scatter(x[shown], y[shown], s=10, alpha=0.6, label=optimizer)
        drawn += int(shown.sum())
    if drawn:
        axis.set_xscale("log")
    axis.set_xlabel("val_loss")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    axis.set_title(title, fontsize="medium")
    save_figure(figure, path)


def save_figure(figure: Any, path: Path, title: str | None = None, dpi: int = 120) -> None:
    """Title ``figure`` (a matplotlib figure), lay it out, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    if title is not None:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it over ``path`` once written (atomic)."""
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
