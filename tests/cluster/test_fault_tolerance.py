"""SIGKILL one Ray Train worker mid-run: the job restarts from the latest checkpoint, finishes
its configured steps, and over the epoch every sample is read exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from condmoe.datasets import StreamingLoader
from condmoe.trainer.checkpoint import latest_checkpoint, read_meta
from condmoe.trainer.config import WORKER_MALLOC_ENV
from worker_kill import kill_worker_after_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONDMOE = Path(sys.executable).parent / "condmoe"
JOB = Path(__file__).resolve().parents[2] / "configs" / "topk_moe.yaml"


def _lines(keys_dir: Path) -> list[dict]:
    out = []
    for f in sorted(keys_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                out.append({**json.loads(line), "file": f.name})
    return out


def test_sigkill_worker_resumes_exactly_once(fmnist_shards, tmp_path):
    batch = 64
    steps = len(StreamingLoader(fmnist_shards, "train", batch))  # one whole epoch, global batch 64
    storage = tmp_path / "runs"
    run = storage / "topk_moe"
    cmd = [str(CONDMOE), "train", str(JOB), "--json", "--set", f"data.path={fmnist_shards}",
           "--set", "model.size=tiny", "--set", f"optim.steps={steps}", "--set", f"data.batch_size={batch}",
           "--set", "checkpoint.every=3", "--set", "metrics.log_every=1", "--set", "metrics.eval_batches=1",
           "--set", "metrics.record_keys=true", "--set", "cluster.max_failures=2",
           "--set", "cluster.env.CONDMOE_PROBE=fault", "--set", "cluster.env.MALLOC_TRIM_THRESHOLD_=",
           "--set", f"cluster.storage_path={storage}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def check_env(pid: int) -> None:
        # the job's worker env reached the training process: defaults, additions, removals
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0")
                       if "=" in kv)
        assert environ.get("CONDMOE_PROBE") == "fault"
        assert environ.get("MALLOC_MMAP_THRESHOLD_") == WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
        assert "MALLOC_TRIM_THRESHOLD_" not in environ

    killed = None
    try:
        deadline = time.monotonic() + 400
        killed = kill_worker_after_checkpoint(proc, run, deadline=deadline, before_kill=check_env)
        assert killed is not None, "the run ended before a worker could be killed"
        out, _ = proc.communicate(timeout=max(30.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["metrics"]["step"] == steps
    pid, kill_step, ckpt_step = killed
    lines = _lines(run / "keys")
    pids = {ln["pid"] for ln in lines}
    assert len(pids) >= 4, "no restarted worker group"  # 2 workers x 2 attempts
    # the restarted attempt started right after a checkpoint, never from step 1
    second = [ln for ln in lines if ln["pid"] not in {x["pid"] for x in lines if x["step"] == 1}]
    first_resumed = min(ln["step"] for ln in second)
    assert first_resumed - 1 in range(3, kill_step + 1, 3) and first_resumed > 1
    # final view: per (rank, step) the last attempt's batch; every sample of the epoch once
    final: dict[tuple[str, int], list[str]] = {}
    for ln in lines:
        final[(ln["file"], ln["step"])] = ln["keys"]
    assert sorted({s for _, s in final}) == list(range(1, steps + 1))
    counts = Counter(k for keys in final.values() for k in keys)
    assert max(counts.values()) == 1, [k for k, c in counts.items() if c > 1][:5]
    assert sum(counts.values()) == steps * batch
    # the resumed attempt re-read exactly the steps after its checkpoint, nothing before
    assert all(ln["step"] >= first_resumed for ln in second)
    meta = read_meta(latest_checkpoint(run / "checkpoints"))
    assert meta["step"] == steps
