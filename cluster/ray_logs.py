"""Which of Ray's own log lines from a job's workers reach the user's terminal.

Ray Train logs every ``ray.train.report`` call on every worker at INFO
("Reporting training result N: TrainingReport(checkpoint=..., metrics={...})
from rank R", ray/train/v2/_internal/execution/context.py, a logger named
after that file), and Ray forwards worker logs to the driver's terminal: two
screen-wide lines per checkpoint. condmoe's own checkpoint line says the same
in one, so each worker lowers that logger to WARNING (warnings and errors still
pass) unless its environment has ``CONDMOE_VERBOSE=1``; ``condmoe -v train``
sets it through the job's ``cluster.env``.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

VERBOSE_ENV = "CONDMOE_VERBOSE"


def quiet_train_reports() -> None:
    """In a Ray Train worker: no INFO line per report unless ``CONDMOE_VERBOSE`` is set (not 0)."""
    if os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay, nothing else changes
        log.debug("Ray Train's report logger not found; its per-report lines stay")
        return
    reports = getattr(context, "logger", None)
    if isinstance(reports, logging.Logger):
        reports.setLevel(logging.WARNING)
