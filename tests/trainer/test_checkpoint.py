"""Atomic checkpoints: a SIGKILL while one is written leaves the previous one chosen and loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_testlib import tiny_job

from condmoe.trainer.checkpoint import CheckpointManager, latest_checkpoint, list_checkpoints, resolve_checkpoint

WORKER = Path(__file__).resolve().parent / "_ckpt_worker.py"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(job_file, tmp_path, fmnist_shards):
    job = job_file(tiny_job(fmnist_shards), "ck")
    out = tmp_path / "out.json"
    p = subprocess.run([sys.executable, str(WORKER), str(job), "save-then-kill", str(out)], env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    root = tmp_path / "runs" / "ck" / "checkpoints"
    # the half-committed step 2 exists only as a dot-dir, never chosen
    assert (root / ".tmp-step-00000002" / "meta.json").is_file()
    assert [c.name for c in list_checkpoints(root)] == ["step-00000001"]
    assert latest_checkpoint(root).name == "step-00000001"
    assert resolve_checkpoint(tmp_path / "runs" / "ck").name == "step-00000001"
    p = subprocess.run([sys.executable, str(WORKER), str(job), "load", str(out)], env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["step"] == 1 and res["same_weights"] and res["latest"].endswith("step-00000001")
    # the next successful save cleans the stale temp dir
    assert not (root / ".tmp-step-00000002").exists()
    assert [c.name for c in list_checkpoints(root)] == ["step-00000001", "step-00000003"]


def test_resolve_and_keep_last_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (tmp_path / "step-00000009").mkdir()  # no meta.json: incomplete, ignored
    assert resolve_checkpoint(tmp_path).name == "step-00000003"
    CheckpointManager(tmp_path, keep_last=2)._prune()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
