"""Helpers for the GPU tests: run ``python -m condmoe.trainer`` / ``condmoe train`` as a job would."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CONDMOE = str(Path(sys.executable).parent / "condmoe")


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job process: DS_ACCELERATOR left to trainer/device.py, few CPU threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RAY_ADDRESS", "RANK", "WORLD_SIZE",
                                                           "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "2", **extra}


def short_run(data, storage, name: str, steps: int = 4, *, use_gpu: bool = True) -> list[str]:
    """--set overrides for a few steps of a configs/ job with checkpoints every 2 steps."""
    return ["--set", f"data.path={data}", "--set", f"cluster.storage_path={storage}", "--set", f"cluster.name={name}",
            "--set", f"cluster.use_gpu={'true' if use_gpu else 'false'}", "--set", f"optim.steps={steps}",
            "--set", "optim.warmup_steps=1", "--set", "metrics.log_every=1", "--set", "metrics.eval_batches=2",
            "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=4"]


@dataclass
class Run:
    """A finished job process: exit status, its output, its result line and metrics.jsonl records."""

    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def result(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])

    def records(self, kind: str | None = None) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r for r in recs if kind is None or r["kind"] == kind]

    def check(self) -> "Run":
        assert self.returncode == 0, f"exit {self.returncode}:\n{self.stderr[-6000:]}"
        losses = [r["loss"] for r in self.records("step")]
        assert losses and all(math.isfinite(v) for v in losses), losses
        return self


def start_trainer(job: Path, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "condmoe.trainer", str(job), *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 600) -> Run:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return Run(proc.returncode, out, err, run_dir)


def run_trainer(job: Path, overrides: list[str], run_dir: Path, timeout: float = 600, **env: str) -> Run:
    """``python -m condmoe.trainer JOB --set ...`` in one process (one GPU, no Ray)."""
    return finish(start_trainer(job, overrides, job_env(**env)), run_dir, timeout)
