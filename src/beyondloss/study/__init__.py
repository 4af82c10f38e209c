"""Studies: grids of training runs on a task, their selection and their reports.

:mod:`~beyondloss.study.ttf` is the engine: it runs a grid of (optimizer × learning rate ×
seed) on one task, with weight averages and seed ensembles judged by the task's own rollouts;
:mod:`~beyondloss.study.posthoc` is the post-hoc paper's preset on the same engine (per-epoch
logits, temperature scaling, epoch selection); :mod:`~beyondloss.study.report` turns
final-epoch metrics into tables and plots. Selection and its statistics live in
:mod:`beyondloss.selection` (:mod:`~beyondloss.selection.configs`,
:mod:`~beyondloss.selection.statistics`).
"""

from beyondloss.selection.configs import Summary, select_lr, summarize
from beyondloss.selection.statistics import kendall_tau, mean_ci, paired_gain
from beyondloss.study.ttf import (
    DEFAULT_LRS,
    DEFAULT_OPTIMIZERS,
    StudyResult,
    StudySpec,
    run_all,
    run_study,
)

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_OPTIMIZERS",
    "StudyResult",
    "StudySpec",
    "Summary",
    "kendall_tau",
    "mean_ci",
    "paired_gain",
    "run_all",
    "run_study",
    "select_lr",
    "summarize",
]
