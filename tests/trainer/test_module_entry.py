"""`python -m condmoe.trainer`: one worker without Ray (also the plain deepspeed launcher's entry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from condmoe.trainer.records import read_jsonl

JOB = Path(__file__).resolve().parents[2] / "configs" / "cigt.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_module_entry_trains_one_process(fmnist_shards, tmp_path):
    cmd = [sys.executable, "-m", "condmoe.trainer", str(JOB), "--local_rank=0",
           "--set", f"data.path={fmnist_shards}", "--set", "model.size=tiny", "--set", "optim.steps=3",
           "--set", "data.batch_size=32", "--set", "metrics.eval_batches=1",
           "--set", f"cluster.storage_path={tmp_path}"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["step"] == 3 and res["checkpoint"].endswith("step-00000003")
    assert 0.0 <= res["eval"]["eval_accuracy"] <= 1.0
    history = read_jsonl(tmp_path / "cigt" / "metrics.jsonl")
    assert [h["kind"] for h in history] == ["restart", "step", "eval", "checkpoint"]  # log_every 20: one report
    assert history[-1]["step"] == 3 and history[-1]["path"] == res["checkpoint"]


def test_module_entry_bad_key(tmp_path):
    p = subprocess.run([sys.executable, "-m", "condmoe.trainer", str(JOB), "--set", "optim.nope=1"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown key 'optim.nope'" in p.stderr
