"""Helpers for trainer tests: run N real worker processes (gloo) on one job file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from condmoe.trainer.engine import free_port

WORKER = Path(__file__).resolve().parent / "_train_worker.py"


def rank_env(rank: int, world: int, port: str) -> dict[str, str]:
    """The environment of rank ``rank`` of a ``world``-process gloo group on 127.0.0.1:``port``."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _touch(path: str) -> None:
    Path(path).touch()


class CodeRunningPayload:
    """Unpickling this runs code: it touches ``marker`` (for the tests that a loader refuses it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def start_workers(job: Path, world: int, out: Path, *, resume: str | None = None,
                  overrides: list[str] = ()) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = rank_env(rank, world, port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(job), str(out),
                                       resume or "-", *overrides], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def run_workers(job: Path, world: int, out: Path, *, resume: str | None = None,
                overrides: list[str] = (), timeout: float = 240) -> dict:
    """Start ``world`` training processes on ``job``; returns rank 0's result JSON."""
    procs = start_workers(job, world, out, resume=resume, overrides=overrides)
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            logs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise AssertionError(f"worker exited {p.returncode}:\n{log[-4000:]}")
    res = json.loads(out.read_text())
    res["losses"] = {int(k): v for k, v in res["losses"].items()}
    return res


def tiny_job(data: str | Path, model: str = "test_soft_cnn", *, steps: int = 6, every: int = 3,
             **model_opts) -> dict:
    """A job dict for the tiny test models on a Fashion-MNIST shard slice."""
    return {"model": {"name": model, "size": "tiny", "experts": 4, **model_opts},
            "data": {"path": str(data), "batch_size": 32, "eval_batch_size": 128},
            "optim": {"steps": steps, "lr": 0.003, "schedule": "warmup", "warmup_steps": 8},
            "checkpoint": {"every": every, "keep_last": 2},
            "metrics": {"log_every": 2, "eval_batches": 1}}
