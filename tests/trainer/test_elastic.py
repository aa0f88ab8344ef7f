"""Elastic jobs (cluster.workers: [min, max]): the per-world rules, and a resize that keeps the
global batch (same losses) and reads every sample once."""

from __future__ import annotations

import json

import pytest

from condmoe.trainer.checkpoint import latest_checkpoint, read_meta
from condmoe.trainer.config import ConfigError, elastic_ep_size, job_from_dict, load_job

from trainer_testlib import run_workers, tiny_job


def _job(workers, batch=64, grad_accum=1, experts=8, ep_size=4) -> dict:
    return {"model": {"name": "topk_moe_cnn", "size": "tiny", "experts": experts, "ep_size": ep_size},
            "data": {"path": "/nowhere", "batch_size": batch}, "optim": {"grad_accum": grad_accum},
            "cluster": {"workers": workers}}


def test_ep_size_rule():
    # the largest d <= ep_size dividing both experts and the world
    assert [elastic_ep_size(8, 4, w) for w in (1, 2, 3, 4, 6, 8)] == [1, 2, 1, 4, 2, 4]
    assert elastic_ep_size(6, 6, 4) == 2 and elastic_ep_size(5, 1, 7) == 1


def test_elastic_config_per_world():
    cfg = job_from_dict(_job([1, 4], batch=48, grad_accum=3))
    assert cfg.cluster.elastic and (cfg.cluster.min_workers, cfg.cluster.max_workers) == (1, 4)
    # micro batch fixed at 48 / (4 * 3) = 4; grad_accum takes up the missing workers
    assert [cfg.micro_batch(w) for w in (1, 2, 3, 4)] == [4, 4, 4, 4]
    assert [cfg.grad_accum_for(w) for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    two = cfg.for_world(2)
    assert (two.cluster.workers, two.optim.grad_accum, two.model.ep_size) == (2, 6, 2)
    assert two.micro_batch(2) * 2 * two.optim.grad_accum == 48 and cfg.cluster.workers == (1, 4)
    with pytest.raises(ConfigError, match="cannot run on 5 workers"):
        cfg.for_world(5)
    # a fixed size is unchanged, whatever world it is asked about
    fixed = job_from_dict(_job(2, ep_size=2))
    assert fixed.for_world(2) is fixed and fixed.grad_accum_for(1) == 1 and fixed.ep_size_for(1) == 2
    # the dump (how the job travels to Ray workers) validates back to an equal config
    assert job_from_dict(json.loads(cfg.model_dump_json())) == cfg


@pytest.mark.parametrize("workers, message", [
    ([1, 3], "cluster.workers=[1, 3]: data.batch_size=64 is not divisible by max workers*grad_accum=3"),
    ([2, 4], "cluster.workers=[2, 4]: on 3 workers data.batch_size=64 is not a whole number of micro-batches "
             "of 16 per worker"),
    ([3, 2], "workers must be >= 1 or [min, max] with 1 <= min <= max"),
])
def test_elastic_sizes_checked_at_load(tmp_path, workers, message):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(1)))
    with pytest.raises(ConfigError) as err:
        load_job(path, [f"cluster.workers={json.dumps(workers)}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def _keys(run_dir) -> dict[int, list[str]]:
    """step -> the global batch's sample keys over every rank and micro-step (one attempt per step here)."""
    out: dict[int, list[str]] = {}
    for f in sorted((run_dir / "keys").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(rec["keys"])
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_elastic_resize_keeps_global_batch(job_file, tmp_path, fmnist_shards):
    """[1, 2] workers, expert parallel: 2 workers (ep 2, grad_accum 1) for 3 steps, then 1 worker
    (ep 1, grad_accum 2) from that checkpoint. Every step's loss equals a 1-worker run's (the same
    32 samples per step), and over the 6 steps every sample is read once."""
    job = tiny_job(fmnist_shards, "test_moe_cnn", steps=6, every=3, ep_size=2)
    job["cluster"] = {"workers": [1, 2]}
    job["metrics"]["record_keys"] = True
    base = run_workers(job_file(job, "base"), 1, tmp_path / "base.json")
    grown = run_workers(job_file({**job, "optim": {**job["optim"], "steps": 3}}, "resized"), 2, tmp_path / "a.json")
    meta = read_meta(grown["checkpoint"])
    assert (meta["step"], meta["world_size"], meta["ep_size"]) == (3, 2, 2)
    shrunk = run_workers(job_file(job, "resized"), 1, tmp_path / "b.json")  # the run's own newest checkpoint
    assert shrunk["resumed_from"] == grown["checkpoint"] and sorted(shrunk["losses"]) == [4, 5, 6]
    meta = read_meta(latest_checkpoint(tmp_path / "runs" / "resized" / "checkpoints"))
    assert (meta["step"], meta["world_size"], meta["ep_size"]) == (6, 1, 1)
    losses = {**grown["losses"], **shrunk["losses"]}
    for s in range(1, 7):
        assert abs(losses[s] - base["losses"][s]) <= 2e-3 * abs(base["losses"][s]), (s, losses[s], base["losses"][s])
    keys, ref = _keys(tmp_path / "runs" / "resized"), _keys(tmp_path / "runs" / "base")
    assert sorted(keys) == list(range(1, 7))
    assert all(sorted(keys[s]) == sorted(ref[s]) and len(keys[s]) == 32 for s in keys)
    flat = [k for s in keys for k in keys[s]]
    assert len(flat) == len(set(flat)) == 6 * 32
