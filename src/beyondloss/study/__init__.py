"""Studies: grids of training runs on a task, their selection and their reports.

:mod:`~beyondloss.study.ttf` runs the test-time-feedback study (optimizer × learning rate ×
seed on one task, learning rate selected by one-step validation loss or by the downstream
metric); :mod:`~beyondloss.study.report` turns final-epoch metrics into tables and plots;
:mod:`~beyondloss.selection.statistics` holds the confidence intervals, paired gains and Kendall τ.
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
