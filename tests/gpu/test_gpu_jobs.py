"""Jobs on real GPUs (marker gpu; skipped without CUDA): every configs/ job, bf16, resume across devices.

Each job runs a few steps in its own process, the way ``python -m condmoe.trainer`` (one GPU, no
Ray) or ``condmoe train`` (Ray, one GPU per worker) runs it. The engine logs where it placed the
model; a batch left on the CPU would fail the first forward on a CUDA model, so a finished run
with finite losses and the ``device cuda:N`` line is a run on the GPU.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from gpu_testlib import (CONDMOE, CONFIGS, ROOT, Run, finish, gpu_count, job_env, run_trainer, short_run,
                         start_trainer)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ON_GPU = "device cuda:{} (DeepSpeed accelerator cuda, cpu:gloo,cuda:nccl"


@pytest.fixture(scope="module")
def config_runs(fmnist_shards, tmp_path_factory) -> dict[str, Run]:
    """Every configs/ job for 4 steps on GPU 0 (expert-parallel ones at ep_size 1), all at once."""
    storage = tmp_path_factory.mktemp("runs")
    procs = {}
    for job in CONFIGS:
        overrides = short_run(fmnist_shards, storage, job.stem) + ["--set", "model.ep_size=1",
                                                                   "--set", "cluster.workers=1"]
        procs[job.stem] = start_trainer(job, overrides, job_env())
    return {name: finish(p, storage / name) for name, p in procs.items()}


@pytest.mark.parametrize("name", [p.stem for p in CONFIGS])
def test_every_config_job_trains_on_one_gpu(config_runs, name):
    run = config_runs[name].check()
    assert ON_GPU.format(0) in run.stderr and "inputs float32" in run.stderr, run.stderr[-3000:]
    res = run.result
    assert res["step"] == 4 and res["checkpoint"].endswith("step-00000004")
    assert 0.0 <= res["eval"]["eval_accuracy"] <= 1.0 and res["eval"]["eval_macs_per_sample"] > 0
    assert [r["step"] for r in run.records("checkpoint")] == [2, 4]


def test_bf16_channels_last_job_with_pinned_loader_workers(fmnist_shards, tmp_path):
    """deepspeed.bf16 on a GPU: bf16 inputs (channels-last), batches pinned by 2 DataLoader workers."""
    overrides = short_run(fmnist_shards, tmp_path, "bf16", steps=6) + [
        "--set", "deepspeed.bf16=true", "--set", "model.channels_last=true", "--set", "data.num_workers=2"]
    run = run_trainer(ROOT / "configs/condconv.yaml", overrides, tmp_path / "bf16").check()
    assert ON_GPU.format(0) in run.stderr and "inputs bfloat16, channels_last" in run.stderr
    assert run.result["step"] == 6
    meta = json.loads((tmp_path / "bf16/checkpoints/step-00000006/meta.json").read_text())
    assert meta["zero_stage"] == 1  # bf16 keeps fp32 master weights from ZeRO 1 on
    cigt = run_trainer(ROOT / "configs/cigt.yaml", short_run(fmnist_shards, tmp_path, "cigt_bf16") +
                       ["--set", "deepspeed.bf16=true"], tmp_path / "cigt_bf16").check()
    assert "inputs bfloat16" in cigt.stderr  # the information-gain loss stays fp32 inside


def test_resume_gpu_checkpoint_on_cpu_and_back(fmnist_shards, tmp_path):
    """GPU fp32 -> CPU fp32 (same topology: DeepSpeed's own load, tensors mapped to the CPU) ->
    GPU bf16 (ZeRO 1: the portable state) -> CPU fp32 (portable state saved from GPU tensors)."""
    job = ROOT / "configs/condconv.yaml"
    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    chain = [(2, True, False, {}), (4, False, False, cpu), (6, True, True, {}), (8, False, False, cpu)]
    prev = 0
    for steps, use_gpu, bf16, env in chain:
        overrides = short_run(fmnist_shards, tmp_path, "hop", steps=steps, use_gpu=use_gpu) + [
            "--set", f"deepspeed.bf16={'true' if bf16 else 'false'}", "--set", "model.size=tiny"]
        run = run_trainer(job, overrides, tmp_path / "hop", **env).check()
        restarts = run.records("restart")
        assert restarts[-1]["step"] == prev, restarts  # resumed where the previous hop stopped
        assert (ON_GPU.format(0) in run.stderr) == use_gpu
        assert run.result["step"] == steps
        prev = steps


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", ["topk_moe", "coe"])
def test_expert_parallel_over_nccl_on_two_gpus(fmnist_shards, tmp_path, name):
    """ep_size 2 on two GPUs: the experts' all-to-all runs over NCCL (torchrun-style launch)."""
    from condmoe.trainer.engine import free_port

    port, procs = str(free_port()), []
    overrides = short_run(fmnist_shards, tmp_path, name) + ["--set", "model.ep_size=2", "--set", "cluster.workers=2"]
    for rank in range(2):
        env = job_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(start_trainer(ROOT / f"configs/{name}.yaml", overrides, env))
    runs = [finish(p, tmp_path / name) for p in procs]
    for rank, run in enumerate(runs):
        assert run.returncode == 0, f"rank {rank}:\n{run.stderr[-6000:]}"
        assert ON_GPU.format(rank) in run.stderr
    runs[0].check()
    assert runs[0].result["step"] == 4


@pytest.mark.ray
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")
def test_two_ray_workers_on_two_gpus(fmnist_shards, tmp_path):
    """condmoe train on the embedded Ray: two workers, one GPU each, NCCL between them."""
    env = job_env()
    cmd = [CONDMOE, "train", str(ROOT / "configs/condconv.yaml"), "--json", *short_run(fmnist_shards, tmp_path, "ray2"),
           "--set", "cluster.workers=2", "--set", "cluster.cpus_per_worker=2", "--set", "metrics.prometheus.port=0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    out = json.loads(p.stdout)
    assert out["metrics"]["step"] == 4 and 0.0 <= out["metrics"]["eval_accuracy"] <= 1.0


def test_preflight_passes_where_gpus_exist():
    """The check that fails without GPUs lets this machine's job through."""
    from condmoe.trainer.config import job_from_dict
    from condmoe.trainer.device import decide_placement, require_local_gpus

    require_local_gpus(1)
    cfg = job_from_dict({"model": {"name": "condconv_cnn"}, "data": {"path": "/x"}, "cluster": {"use_gpu": True}})
    assert decide_placement(cfg, env={"LOCAL_RANK": "0"}).device.type == "cuda"
