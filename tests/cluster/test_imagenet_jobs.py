"""The ImageNet-scale jobs of configs/ train in 2-worker Ray jobs from JPEG shards, resume, export routing stats.

One photo-like JPEG folder (ImageNet's train/ + val/ layout, a few hundred images of varying size
and aspect ratio) is generated once and written as shards of the original JPEG bytes; every job
file then trains from it on one embedded Ray, at a reduced resolution (64 px; 32 for cigt_resnet,
its native size) and batch 8, so the file stays within a few minutes on two cores.

Resume: for one soft-routed family (CondConv-EfficientNet-B0) and one hard-routed family with
expert parallelism (CoE, ep_size 2) a run resumed from the step-2 checkpoint of a 4-step run gives
the same losses for steps 3-4 as the uninterrupted run (same topology: DeepSpeed's sharded load);
for the others the 2-step run started again with 4 steps in one process without Ray
(``python -m condmoe.trainer``, a third of a Ray launch's CPU) continues from its own step-2
checkpoint (world 2 -> 1: the portable state, re-sharded). Routing export: the run's Parquet
log has a row for every routed layer of the family at every step, and the checkpoints' routing
totals hold every routed layer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from condmoe.cluster.launch import launch
from condmoe.trainer.checkpoint import list_checkpoints, read_meta
from condmoe.trainer.config import dump_job, load_job
from condmoe.trainer.records import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# job file -> (resolution in this test, overrides that shrink it further)
JOBS: dict[str, tuple[int, list[str]]] = {
    "condconv_efficientnet_b0": (64, []),
    "condconv_mobilenet_v1": (64, []),
    "condconv_mobilenet_v2": (64, []),
    "basisnet_mobilenet_v3": (64, []),
    "coe_mobilenet": (64, []),
    "cigt_resnet": (32, ["model.size=tiny"]),  # the authors' resnet110 trellis has 54 blocks per path
}
EXACT = ("condconv_efficientnet_b0", "coe_mobilenet")  # one soft-routed, one hard-routed with ep_size 2
CLASSES, BATCH = 4, 8


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> Path:
    """4 classes x 60 train + 8 val photo-like JPEGs, sides 48-160 px, as shards of the original bytes."""
    from condmoe.datasets import make_photo_folder, write_shards

    root = tmp_path_factory.mktemp("imagenet_jobs")
    folder = make_photo_folder(root / "photos", classes=CLASSES, per_class=60, val_per_class=8,
                               layout="imagenet", min_side=48, max_side=160, seed=5)
    return write_shards(f"imagefolder:{folder}", root / "shards", samples_per_shard=64)


def _job(name: str, shards: Path, storage: Path, run: str, steps: int, workers: int = 2):
    res, extra = JOBS[name]
    return load_job(CONFIGS / f"{name}.yaml", [
        f"data.path={shards}", f"data.resolution={res}", f"data.batch_size={BATCH}", "data.eval_batch_size=16",
        "data.num_workers=0", f"model.num_classes={CLASSES}", f"optim.steps={steps}", "optim.warmup_steps=1",
        "checkpoint.every=2", "metrics.log_every=1", "metrics.eval_every=0", "metrics.eval_batches=1",
        "metrics.prometheus.enabled=false", f"cluster.storage_path={storage}", f"cluster.name={run}",
        f"cluster.workers={workers}", "cluster.cpus_per_worker=1", "cluster.max_failures=0", *extra])


def _routed_layers(cfg) -> set[str]:
    """Names of the family's routed modules as the trainer reports them (a local build, experts not spread)."""
    import torch

    from condmoe.routing import build_model
    from condmoe.routing.routing_output import RoutedModule

    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model.name, cfg.model.size, **{**cfg.model.build_kwargs(), "ep_size": 1})
    return {name or "root" for name, m in model.named_modules() if isinstance(m, RoutedModule)}


def _train_in_one_process(cfg) -> dict:
    """``python -m condmoe.trainer`` on ``cfg`` (a world of one, no Ray); its JSON result."""
    job = cfg.run_dir.parent / f"{cfg.run_name}-one-process.yaml"
    job.write_text(dump_job(cfg))
    p = subprocess.run([sys.executable, "-m", "condmoe.trainer", str(job)], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _losses(cfg) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl", "step")}


def _check_routing_export(cfg, steps: range) -> None:
    from condmoe.cluster.parquet_log import read_routing

    expected = _routed_layers(cfg)
    assert expected, f"{cfg.model.name}: no routed layers"
    rows = read_routing(cfg.run_dir).select(["step", "layer", "samples"]).to_pylist()
    by_step: dict[int, set[str]] = {}
    for r in rows:
        by_step.setdefault(r["step"], set()).add(r["layer"])
    assert sorted(by_step) == list(steps), f"{cfg.model.name}: Parquet routing rows for steps {sorted(by_step)}"
    for s, layers in by_step.items():
        assert layers == expected, f"{cfg.model.name} step {s}: missing {sorted(expected - layers)[:5]}, " \
                                   f"unexpected {sorted(layers - expected)[:5]}"
    assert all(r["samples"] > 0 for r in rows)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", list(JOBS))
def test_imagenet_job_trains_resumes_and_exports_routing(name, jpeg_shards, ray_local, tmp_path):
    exact = name in EXACT
    first = _job(name, jpeg_shards, tmp_path, "first", 4 if exact else 2)
    res = launch(first)
    assert res.error is None, res.error
    steps = first.optim.steps
    assert res.metrics["step"] == steps
    assert 0.0 <= res.metrics["eval_accuracy"] <= 1.0 and res.metrics["eval_macs_per_sample"] > 0
    losses = _losses(first)
    assert sorted(losses) == list(range(1, steps + 1)) and all(math.isfinite(v) for v in losses.values())
    ckpts = list_checkpoints(first.checkpoint_dir)
    assert [read_meta(c)["step"] for c in ckpts] == list(range(2, steps + 1, 2))
    meta = read_meta(ckpts[-1])
    assert meta["world_size"] == 2 and meta["ep_size"] == first.model.ep_size
    assert meta["data"]["loader"]["position"] == steps * BATCH
    assert set(meta["routing"]) == _routed_layers(first), "routing totals of the checkpoint"
    assert all(t["samples"] > 0 for t in meta["routing"].values())
    _check_routing_export(first, range(1, steps + 1))

    if exact:  # a new run from the step-2 checkpoint continues exactly as the uninterrupted one
        again = _job(name, jpeg_shards, tmp_path, "resumed", 4)
        res2 = launch(again, resume=str(ckpts[0]))
        assert res2.error is None, res2.error
        assert res2.metrics["step"] == 4
    else:  # the same run, started again with more steps in one process, continues from its own checkpoint
        again = _job(name, jpeg_shards, tmp_path, "first", 4, workers=1)
        out = _train_in_one_process(again)
        assert out["step"] == 4 and 0.0 <= out["eval"]["eval_accuracy"] <= 1.0
    (restart,) = [r for r in read_jsonl(again.run_dir / "metrics.jsonl", "restart") if r["step"] > 0]
    assert restart["step"] == 2
    later = {s: v for s, v in _losses(again).items() if s > 2} if not exact else _losses(again)
    assert sorted(later) == [3, 4] and all(math.isfinite(v) for v in later.values())
    if exact:
        for s in (3, 4):
            assert later[s] == pytest.approx(losses[s], rel=1e-5, abs=1e-6), \
                f"{name} step {s}: resumed {later[s]} vs uninterrupted {losses[s]}"
    final = read_meta(list_checkpoints(again.checkpoint_dir)[-1])
    assert final["step"] == 4 and final["world_size"] == again.cluster.workers
    assert final["data"]["loader"]["position"] == 4 * BATCH
    # routing totals continue across the resume: steps 3-4 add as many samples per layer as steps 1-2
    half = read_meta(ckpts[0])["routing"]
    assert {n: t["samples"] for n, t in final["routing"].items()} == {n: 2 * t["samples"] for n, t in half.items()}
