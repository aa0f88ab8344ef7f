"""Train with real DeepSpeed engines on gloo; resume on the same and on a different worker count.

The next steps' losses after a resume must match an uninterrupted run: that
needs the weights, the ZeRO-sharded Adam state, the lr schedule and the data
position all restored (fresh Adam moments would change the update).
"""

from __future__ import annotations

import pytest

import json

from condmoe.trainer.checkpoint import list_checkpoints, read_meta

from trainer_testlib import run_workers, tiny_job

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _keys(run_dir) -> dict[int, set[str]]:
    """step -> the global batch's sample keys, from every rank's key log."""
    out: dict[int, set[str]] = {}
    for f in (run_dir / "keys").glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], set()).update(rec["keys"])
    return out


def _with_keys(job: dict) -> dict:
    return {**job, "metrics": {**job["metrics"], "record_keys": True}}


def _close(a: dict, b: dict, steps, rel: float) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= rel * abs(b[s]), f"step {s}: {a[s]} vs {b[s]}"


def test_zero_resume_on_other_world_size(job_file, tmp_path, fmnist_shards):
    """2 -> 1 and 1 -> 2 workers from the step-3 checkpoint of a 6-step run (warm-up lr schedule).

    (Same-topology resume, DeepSpeed's own load, is covered by the fault-tolerance
    and checkpoint-kill tests.)
    """
    full = run_workers(job_file(_with_keys(tiny_job(fmnist_shards, steps=6, every=3)), "full"), 2,
                       tmp_path / "full.json")
    assert full["step"] == 6 and full["losses"][6] < full["losses"][1]
    runs = tmp_path / "runs"
    ckpt = str(list_checkpoints(runs / "full" / "checkpoints")[0])
    meta = read_meta(ckpt)
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["data"]["loader"]["position"] == 96
    assert meta["routing"]["mix"]["samples"] == 96
    one = run_workers(job_file(_with_keys(tiny_job(fmnist_shards, steps=6)), "one"), 1, tmp_path / "one.json",
                      resume=ckpt)
    assert one["resumed_from"] == ckpt and sorted(one["losses"]) == [4, 5, 6]
    _close(one["losses"], full["losses"], [4, 5, 6], 1e-4)
    # the data position converted: 1 worker reads exactly the samples 2 workers read next
    full_keys, one_keys = _keys(runs / "full"), _keys(runs / "one")
    assert sorted(one_keys) == [4, 5, 6]
    assert all(one_keys[s] == full_keys[s] for s in (4, 5, 6))
    assert len(set().union(*full_keys.values())) == 6 * 32
    # routing totals continue across the resume: 6 steps x 32 samples
    assert one["routing"]["mix"]["samples"] == 6 * 32
    # started again when already finished: nothing is trained, the checkpoint is evaluated
    again = run_workers(job_file(tiny_job(fmnist_shards, steps=6), "one"), 1, tmp_path / "again.json")
    assert again["step"] == 6 and again["losses"] == {} and "eval_accuracy" in again["eval"]
    # 1 -> 2
    solo = run_workers(job_file(tiny_job(fmnist_shards, steps=3, every=3), "solo"), 1, tmp_path / "solo.json")
    _close(solo["losses"], full["losses"], [1, 2, 3], 1e-4)
    two = run_workers(job_file(tiny_job(fmnist_shards, steps=6), "two"), 2, tmp_path / "two.json",
                      resume=solo["checkpoint"])
    _close(two["losses"], full["losses"], [4, 5, 6], 1e-4)


def test_expert_parallel_resume_ep2_to_ep1(job_file, tmp_path, fmnist_shards):
    job = tiny_job(fmnist_shards, "test_moe_cnn", steps=6, every=3, ep_size=2)
    full = run_workers(job_file(job, "full"), 2, tmp_path / "full.json")
    assert full["losses"][6] < full["losses"][1]
    ckpt_dir = list_checkpoints(tmp_path / "runs" / "full" / "checkpoints")[0]  # step 3 of the same run
    ckpt = str(ckpt_dir)
    assert read_meta(ckpt)["step"] == 3 and read_meta(ckpt)["ep_size"] == 2
    names = {p.name for p in (ckpt_dir / "ds").iterdir()}
    assert any(n.startswith("layer_0_expert_") for n in names), names  # DeepSpeed's expert shards
    one = run_workers(job_file(job, "one"), 1, tmp_path / "one.json", resume=ckpt,
                      overrides=["model.ep_size=1"])
    assert sorted(one["losses"]) == [4, 5, 6]
    _close(one["losses"], full["losses"], [4, 5, 6], 2e-3)
