"""Every configs/ job trains a few steps with 2 workers on embedded Ray on a Fashion-MNIST slice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from condmoe.cluster.launch import launch
from condmoe.trainer.checkpoint import list_checkpoints, read_meta
from condmoe.trainer.config import load_job
from condmoe.trainer.records import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
JOBS = ["condconv", "basisnet", "coe", "cigt", "topk_moe"]


@pytest.mark.parametrize("job", JOBS)
def test_config_job_trains_with_two_workers(job, fmnist_shards, ray_local, tmp_path):
    steps = 12
    cfg = load_job(CONFIGS / f"{job}.yaml", [
        f"data.path={fmnist_shards}", "model.size=tiny", f"optim.steps={steps}", "optim.lr=0.005",
        "optim.warmup_steps=0", "optim.schedule=constant", "data.batch_size=32",
        "data.eval_batch_size=128", "checkpoint.every=6", "metrics.log_every=1",
        "metrics.eval_batches=1", f"cluster.storage_path={tmp_path}", "cluster.workers=2"])
    res = launch(cfg)
    assert res.error is None
    assert res.metrics["step"] == steps
    assert 0.0 <= res.metrics["eval_accuracy"] <= 1.0 and res.metrics["eval_macs_per_sample"] > 0
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    history = [h for h in records if h["kind"] == "step"]
    losses = [h["loss"] for h in history]
    # throughput covers each report interval alone: rate x the time between two step records with
    # nothing (eval, checkpoint) between them is that interval's samples
    for a, b in zip(records, records[1:]):
        if a["kind"] == b["kind"] == "step":
            assert 0.7 <= b["samples_per_s"] * (b["time"] - a["time"]) / b["samples"] <= 1.3, (a, b)
    assert len(losses) == steps
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"{job}: loss did not fall: {losses}"
    ckpts = list_checkpoints(cfg.checkpoint_dir)
    assert [read_meta(c)["step"] for c in ckpts] == [6, 12]
    assert res.checkpoint == ckpts[-1]
    meta = read_meta(ckpts[-1])
    assert meta["world_size"] == 2 and meta["data"]["loader"]["position"] > 0
    assert meta["routing"], "routing-stat totals missing from the checkpoint"
    if job == "coe":  # condmoe eval on one process re-shards the ep 2 checkpoint to ep 1
        p = subprocess.run([str(Path(sys.executable).parent / "condmoe"), "eval", str(cfg.run_dir), "--json",
                            "--max-batches", "2"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert p.returncode == 0, p.stderr[-3000:]
        ev = json.loads(p.stdout.strip().splitlines()[-1])
        assert ev["step"] == steps and ev["eval_samples"] == 2 * cfg.data.eval_batch_size
        assert 0.0 <= ev["eval_accuracy"] <= 1.0 and ev["eval_macs_per_sample"] > 0
        assert 0.0 <= ev["eval_exit_rate"] <= 1.0


def test_rerun_after_a_pruned_checkpoint_left_ray_trains_snapshot_stale(fmnist_shards, ray_local, tmp_path):
    """A driver killed after a save pruned the oldest checkpoint and before its report reached Ray Train
    leaves a run snapshot naming a checkpoint that is gone; Ray Train then refused to start that run
    ever again ("corrupted run directory"). Started again, the run resumes from its newest checkpoint."""
    import shutil

    over = [f"data.path={fmnist_shards}", "model.size=tiny", "optim.warmup_steps=0", "data.batch_size=32",
            "data.eval_batch_size=128", "checkpoint.every=2", "metrics.eval_batches=1", "metrics.eval_every=0",
            "metrics.prometheus.enabled=false", f"cluster.storage_path={tmp_path}", "cluster.workers=1",
            "cluster.name=again"]
    first = load_job(CONFIGS / "condconv.yaml", [*over, "optim.steps=4"])
    assert launch(first).error is None
    snapshot = first.run_dir / "checkpoint_manager_snapshot.json"
    assert "step-00000002" in snapshot.read_text()  # Ray Train's list of the reported checkpoints
    shutil.rmtree(first.checkpoint_dir / "step-00000002")
    again = load_job(CONFIGS / "condconv.yaml", [*over, "optim.steps=6"])
    res = launch(again)
    assert res.error is None and res.metrics["step"] == 6
    restart = read_jsonl(again.run_dir / "metrics.jsonl", "restart")[-1]
    assert restart["step"] == 4 and restart["resumed_from"].endswith("step-00000004")
