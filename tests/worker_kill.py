"""Test helper shared by the Ray fault tests: SIGKILL a training worker once the run is far enough.

Imported by its unique module name (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from condmoe.trainer.checkpoint import latest_checkpoint, read_meta


def rank_lines(run: Path, rank: int) -> list[dict]:
    """The key-log records of one rank (``metrics.record_keys``), oldest first."""
    f = run / "keys" / f"rank{rank}.jsonl"
    if not f.is_file():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def kill_worker_after_checkpoint(proc: subprocess.Popen, run: Path, *, deadline: float, rank: int = 1,
                                 min_checkpoint: int = 3, min_step: int = 5, poll: float = 0.3,
                                 before_kill=None) -> tuple[int, int, int] | None:
    """Once ``run`` holds a checkpoint at step >= ``min_checkpoint`` and ``rank`` has trained step
    >= ``min_step``, SIGKILL that rank's process. Returns (pid, its last step, checkpoint step), or
    None when ``proc`` ended or ``deadline`` (time.monotonic) passed first.

    ``before_kill(pid)`` runs just before the signal (to inspect the live process).
    """
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(poll)
        ck = latest_checkpoint(run / "checkpoints")
        if ck is None or read_meta(ck)["step"] < min_checkpoint:
            continue
        lines = rank_lines(run, rank)
        if lines and lines[-1]["step"] >= min_step:
            pid = lines[-1]["pid"]
            if before_kill is not None:
                before_kill(pid)
            os.kill(pid, signal.SIGKILL)
            return pid, lines[-1]["step"], read_meta(ck)["step"]
    return None
