"""Seed statistics, learning-rate selection and the study's table (markdown, CSV) and plot.

Everything here works on final-epoch metrics already read from the results store; nothing
trains. A *configuration* is an ``(optimizer, lr)`` pair; its runs differ by seed only.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Final-epoch metrics of one configuration over its seeds.

    ``mean[m]`` and ``std[m]`` are the mean and sample standard deviation (``ddof=1``; NaN when
    ``n = 1``) of metric ``m`` over the ``n`` seeds. A non-finite value in any seed (a diverged
    run) makes the mean non-finite.
    """

    optimizer: str
    lr: float
    n: int
    mean: Mapping[str, float]
    std: Mapping[str, float]


def summarize(finals: Mapping[tuple[str, float, int], Mapping[str, float]]) -> list[Summary]:
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
        mean, std = {}, {}
        for name in names:
            values = np.array([row[name] for row in rows], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                mean[name] = float(values.mean())
                std[name] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        summaries.append(Summary(optimizer, lr, len(rows), mean, std))
    return summaries


def select_lr(
    summaries: Sequence[Summary], metric: str, higher_is_better: bool = False
) -> dict[str, Summary]:
    """For each optimizer, its configuration with the best mean ``metric`` over seeds.

    A NaN mean ranks last. Ties go to the configuration listed first. Optimizers appear in
    first-appearance order of ``summaries``.
    """
    sign = -1.0 if higher_is_better else 1.0

    def rank(summary: Summary) -> float:
        value = summary.mean[metric]
        return math.inf if math.isnan(value) else sign * value

    best: dict[str, Summary] = {}
    for summary in summaries:
        incumbent = best.get(summary.optimizer)
        if incumbent is None or rank(summary) < rank(incumbent):
            best[summary.optimizer] = summary
    return best


def format_lr(lr: float) -> str:
    """Learning rate as in run ids and tables: ``0.003``, ``0.0003``, ``1e-05``."""
    return f"{lr:g}"


def _cell(summary: Summary, metric: str) -> str:
    mean = summary.mean.get(metric, math.nan)
    std = summary.std.get(metric, math.nan)
    if math.isnan(std):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.3g}"


def markdown_table(
    rows: Sequence[Summary], metrics: Sequence[str], higher_is_better: Mapping[str, bool]
) -> str:
    """GitHub markdown table: optimizer, lr, n, then ``mean ± std`` of each metric.

    Metric headers carry ↑ or ↓ where ``higher_is_better`` knows the metric.
    """

    def header(metric: str) -> str:
        if metric not in higher_is_better:
            return metric
        return f"{metric} {'↑' if higher_is_better[metric] else '↓'}"

    lines = [
        "| " + " | ".join(["optimizer", "lr", "n", *map(header, metrics)]) + " |",
        "|" + "---|" * 3 + "--:|" * len(metrics),
    ]
    for summary in rows:
        cells = [summary.optimizer, format_lr(summary.lr), str(summary.n)]
        cells += [_cell(summary, metric) for metric in metrics]
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
    ``selections`` (``{criterion: {optimizer: selected summary}}``), then ``<metric>_mean`` and
    ``<metric>_std`` for each metric.
    """
    header = ["optimizer", "lr", "n", *(f"selected_by_{c}" for c in selections)]
    header += [f"{metric}_{stat}" for metric in metrics for stat in ("mean", "std")]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for summary in summaries:
            row: list[object] = [summary.optimizer, repr(summary.lr), summary.n]
            row += [chosen.get(summary.optimizer) is summary for chosen in selections.values()]
            for metric in metrics:
                row += [summary.mean.get(metric, math.nan), summary.std.get(metric, math.nan)]
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
    epoch, with a ±1 std band; the figure is written with the Agg backend.
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
            mean = values.mean(axis=0)
            spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            (line,) = axis.plot(epochs, mean, label=label)
            axis.fill_between(
                epochs, mean - spread, mean + spread, color=line.get_color(), alpha=0.2
            )
    for axis, (metric, log_scale) in zip(axes[0], panels, strict=True):
        data = [np.asarray(line.get_ydata(), dtype=np.float64) for line in axis.get_lines()]
        if log_scale and any((np.isfinite(y) & (y > 0)).any() for y in data):
            axis.set_yscale("log")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
