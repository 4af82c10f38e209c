"""Studies: grids of training runs on a task, their selection and their reports.

:mod:`~beyondloss.study.ttf` runs the test-time-feedback study (optimizer × learning rate ×
seed on one task, learning rate selected by one-step validation loss or by the downstream
metric); :mod:`~beyondloss.study.report` turns final-epoch metrics into tables and plots.
"""

from beyondloss.study.report import Summary, select_lr, summarize
from beyondloss.study.ttf import (
    DEFAULT_LRS,
    DEFAULT_OPTIMIZERS,
    StudyResult,
    StudySpec,
    run_study,
)

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_OPTIMIZERS",
    "StudyResult",
    "StudySpec",
    "Summary",
    "run_study",
    "select_lr",
    "summarize",
]
