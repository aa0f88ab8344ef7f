"""Train with real DeepSpeed engines on gloo; resume on the same and on a different worker count.

The next steps' losses after a resume must match an uninterrupted run: that
needs the weights, the ZeRO-sharded Adam state, the lr schedule and the data
position all restored (fresh Adam moments would change the update).
"""

from __future__ import annotations

import pytest

import json
import shutil
from pathlib import Path

from condmoe.trainer.checkpoint import list_checkpoints, read_meta
from condmoe.trainer.ds_checkpoint import read_portable, storable
from condmoe.trainer.sharded_state import SHARDED_DIR

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
    assert read_meta(one["checkpoint"])["zero_stage"] == 0  # one worker: nothing to shard
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


def test_single_file_portable_checkpoint_still_resumes(job_file, tmp_path, fmnist_shards):
    """A checkpoint as written before the sharded portable state (portable.pt, no portable_format
    in meta.json) resumes on another ZeRO stage (0 -> 1, one worker) with the same next losses."""
    solo = run_workers(job_file(tiny_job(fmnist_shards, steps=6, every=3), "solo"), 1, tmp_path / "solo.json")
    ckpt = list_checkpoints(tmp_path / "runs" / "solo" / "checkpoints")[0]
    assert read_meta(ckpt)["step"] == 3 and read_meta(ckpt)["zero_stage"] == 0
    legacy = str(_as_single_file(ckpt, tmp_path / "legacy" / ckpt.name))
    job = {**tiny_job(fmnist_shards, steps=6), "deepspeed": {"zero_stage": 1, "zero_on_one_worker": True}}
    old = run_workers(job_file(job, "old"), 1, tmp_path / "old.json", resume=legacy)
    assert old["resumed_from"] == legacy and sorted(old["losses"]) == [4, 5, 6]
    assert read_meta(old["checkpoint"])["zero_stage"] == 1
    _close(old["losses"], solo["losses"], [4, 5, 6], 1e-4)


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


def _portable_params(ckpt) -> dict:
    """Every weight of a checkpoint's portable state (either format), by global name."""
    return {n: e["param"] for n, e in read_portable(Path(ckpt))["params"].items()}


def _as_single_file(ckpt: Path, dest: Path) -> Path:
    """``ckpt`` as checkpoints were before the sharded portable state: portable.pt (the whole state
    consolidated), no portable/ directory and no ``portable_format`` in meta.json."""
    import torch

    shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns(SHARDED_DIR))
    torch.save(storable(read_portable(ckpt)), dest / "portable.pt")
    meta = read_meta(ckpt)
    assert meta.pop("portable_format") == "sharded"
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def _same_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        diff = (a[n] - b[n]).abs().max().item()
        assert diff <= atol, f"{n}: max |diff| {diff}"


@pytest.mark.parametrize("stage", [3, 0])
def test_resume_into_other_zero_stage(job_file, tmp_path, fmnist_shards, stage):
    """A ZeRO-2 checkpoint of 2 workers resumes at ZeRO 3 and at ZeRO 0 (2 workers each).

    The next steps' losses match the uninterrupted ZeRO-2 run, the checkpoint the
    resumed run writes at its own stage holds the same weights as the ZeRO-2 run's,
    and a run started again at that stage loads its own (same-topology) checkpoint.
    """
    base = tiny_job(fmnist_shards, steps=6, every=3)
    full = run_workers(job_file(base, "full"), 2, tmp_path / "full.json")
    ckpts = list_checkpoints(tmp_path / "runs" / "full" / "checkpoints")
    assert [read_meta(c)["step"] for c in ckpts] == [3, 6]
    # ZeRO 3 with no "persistent" small params: every param really is partitioned
    extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
    job = job_file({**base, "deepspeed": {"zero_stage": stage, "extra": extra}}, "other")
    other = run_workers(job, 2, tmp_path / "other.json", resume=str(ckpts[0]))
    assert sorted(other["losses"]) == [4, 5, 6]
    _close(other["losses"], full["losses"], [4, 5, 6], 1e-4)
    saved = Path(other["checkpoint"])
    assert read_meta(saved)["step"] == 6 and read_meta(saved)["portable"]
    assert read_meta(saved)["zero_stage"] == stage and read_meta(ckpts[0])["zero_stage"] == 2
    _same_params(_portable_params(saved), _portable_params(ckpts[1]), 1e-4)
    again = run_workers(job, 2, tmp_path / "again.json")
    assert again["step"] == 6 and again["resumed_from"] == str(saved)
    assert abs(again["eval"]["eval_accuracy"] - other["eval"]["eval_accuracy"]) < 1e-9


def test_expert_parallel_resume_ep1_to_ep2(job_file, tmp_path, fmnist_shards):
    """Growing the expert-parallel group: a 1-worker ep-1 checkpoint resumes on 2 workers at ep 2."""
    job = tiny_job(fmnist_shards, "test_moe_cnn", steps=6, every=3, ep_size=1)
    solo = run_workers(job_file(job, "solo"), 1, tmp_path / "solo.json")
    assert solo["losses"][6] < solo["losses"][1]
    ckpt = str(list_checkpoints(tmp_path / "runs" / "solo" / "checkpoints")[0])
    assert read_meta(ckpt)["step"] == 3 and read_meta(ckpt)["ep_size"] == 1
    two = run_workers(job_file(job, "two"), 2, tmp_path / "two.json", resume=ckpt,
                      overrides=["model.ep_size=2"])
    assert sorted(two["losses"]) == [4, 5, 6]
    _close(two["losses"], solo["losses"], [4, 5, 6], 2e-3)
    # the ep-2 run's own checkpoint names every expert by its global id, as the ep-1 run's does
    _same_params(_portable_params(two["checkpoint"]), _portable_params(
        list_checkpoints(tmp_path / "runs" / "solo" / "checkpoints")[1]), 5e-3)
