"""The device decision (trainer/device.py) and what each worker gets, checked without a GPU.

The pure parts take injected device counts and environments, so every LOCAL_RANK /
CUDA_VISIBLE_DEVICES / Ray assignment case is decided here on a CPU; the preflight
error is checked through the CLI, in a subprocess that sees no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from condmoe.trainer.config import ConfigError, deepspeed_config, job_from_dict
from condmoe.trainer.device import (
    CPU_BACKEND,
    GPU_BACKEND,
    GPU_IDS_ENV,
    DeviceError,
    Placement,
    accelerator_name,
    cuda_index,
    decide_placement,
    placement_of,
    process_group_backend,
    require_cluster_gpus,
    require_local_gpus,
)

ROOT = Path(__file__).resolve().parents[2]


def _job(**cluster):
    return job_from_dict({"model": {"name": "condconv_cnn", "size": "tiny", "experts": 4},
                          "data": {"path": "/nowhere"}, "cluster": cluster})


def test_cpu_job_stays_on_cpu_with_gloo():
    cfg = _job(use_gpu=False)
    p = decide_placement(cfg, device_count=8)  # GPUs present or not: use_gpu decides
    assert p.device == torch.device("cpu") and p.backend == "gloo" and p.accelerator == "cpu"
    assert p.dtype == torch.float32 and not p.channels_last and not p.is_cuda
    assert p.deepspeed_args() is None
    x = torch.randn(2, 1, 4, 4)
    assert p.images(x) is x  # no copy on the CPU path
    assert process_group_backend(False) == CPU_BACKEND and accelerator_name(False) == "cpu"


def test_gpu_job_gets_cuda_nccl_and_its_index():
    cfg = _job(use_gpu=True)
    p = decide_placement(cfg, env={"LOCAL_RANK": "1"}, device_count=2)
    assert p.device == torch.device("cuda", 1) and p.accelerator == "cuda" and p.is_cuda
    assert p.backend == GPU_BACKEND == "cpu:gloo,cuda:nccl" == process_group_backend(True)
    assert p.deepspeed_args().device_rank == 1  # DeepSpeed would otherwise take cuda:LOCAL_RANK


def test_bf16_and_channels_last_shape_the_inputs():
    cfg = _job()
    cfg.deepspeed.bf16 = True
    cfg.model.channels_last = True
    p = decide_placement(cfg)
    assert p.dtype == torch.bfloat16 and p.channels_last
    x = p.images(torch.randn(2, 3, 5, 5))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    labels = p.move(torch.arange(4))
    assert labels.dtype == torch.int64  # only images take the training dtype
    assert p.move(None) is None


@pytest.mark.parametrize("count, local_rank, visible, gpu_ids, expected", [
    (1, 0, None, None, 0),                 # python -m condmoe.trainer on a one-GPU machine
    (1, 3, "3", None, 0),                  # one GPU per pod / CUDA_VISIBLE_DEVICES=3: the only one
    (4, 2, None, None, 2),                 # torchrun / deepspeed launcher: LOCAL_RANK indexes the GPUs
    (2, 1, "4,5", None, 1),
    (2, 0, "2,3", "3", 1),                 # Ray Train: the position of Ray's GPU id in the shared list
    (4, 1, "0,1,2,3", "2", 2),             # ray.train.torch.get_device's own docstring examples
    (2, 1, "6,7", "6", 0),
    (16, 2, ",".join(sorted(map(str, range(16)))), "2", 8),  # Ray sorts ids as strings: "10" < "2"
    (4, 0, None, "3", 3),                  # no CUDA_VISIBLE_DEVICES: Ray's ids are physical indices
])
def test_cuda_index(count, local_rank, visible, gpu_ids, expected):
    assert cuda_index(device_count=count, local_rank=local_rank, visible=visible, gpu_ids=gpu_ids) == expected


@pytest.mark.parametrize("count, local_rank, visible, gpu_ids, words", [
    (0, 0, "", None, "sees no CUDA GPU"),
    (2, 2, "0,1", None, "LOCAL_RANK=2 but this worker sees 2 GPUs"),
    (2, 0, "0,1", "5", "GPU 5 assigned to this worker is not among"),
])
def test_cuda_index_errors_are_one_line(count, local_rank, visible, gpu_ids, words):
    with pytest.raises(DeviceError, match=words) as err:
        cuda_index(device_count=count, local_rank=local_rank, visible=visible, gpu_ids=gpu_ids)
    assert "\n" not in str(err.value) and isinstance(err.value, ConfigError)


def test_decide_reads_the_launchers_environment():
    cfg = _job(use_gpu=True)
    env = {"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3", GPU_IDS_ENV: "3"}
    assert decide_placement(cfg, env=env, device_count=4).device == torch.device("cuda", 3)


def test_use_gpu_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="cluster.use_gpu is true but this machine has no usable CUDA GPU") as err:
        decide_placement(_job(use_gpu=True))
    assert "\n" not in str(err.value)
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        require_local_gpus(2)
    with pytest.raises(DeviceError, match="cluster.workers=3 but this machine has 2 GPUs"):
        require_local_gpus(3, available=True, count=2)
    require_local_gpus(2, available=True, count=2)


def test_cluster_gpu_check():
    with pytest.raises(DeviceError, match="the Ray cluster at 10.0.0.1:6379 has 1 GPUs") as err:
        require_cluster_gpus(2, {"CPU": 64.0, "GPU": 1.0}, "10.0.0.1:6379")
    assert "cluster.gpu_check=false" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DeviceError, match="has 0 GPUs"):
        require_cluster_gpus(1, {"CPU": 8.0}, "x:1")
    require_cluster_gpus(2, {"GPU": 2.0}, "x:1")


def test_worker_env_follows_use_gpu():
    from condmoe.cluster.launch import worker_env

    cpu = worker_env(_job(use_gpu=False, env={"DS_ACCELERATOR": "cuda", "FOO": "1"}))
    gpu = worker_env(_job(use_gpu=True))
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["FOO"] == "1"  # use_gpu decides, not cluster.env
    assert gpu["DS_ACCELERATOR"] == "cuda"
    for env in (cpu, gpu):
        assert env["RAY_TRAIN_V2_ENABLED"] == "1" and "MALLOC_MMAP_THRESHOLD_" in env


def test_bf16_runs_zero_1_and_bf16_buffers():
    cfg = _job()
    assert deepspeed_config(cfg, 1)["zero_optimization"]["stage"] == 0
    assert "data_types" not in deepspeed_config(cfg, 1)
    cfg.deepspeed.bf16 = True
    ds = deepspeed_config(cfg, 1)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1  # fp32 master weights
    assert ds["data_types"] == {"buffer_dtype": "bf16"}  # batch-norm statistics in its weights' dtype
    cfg.deepspeed.zero_stage = 2
    assert deepspeed_config(cfg, 2)["zero_optimization"]["stage"] == 2


def test_placement_of_an_engine_without_one_is_the_cpu():
    class Engine:
        pass

    assert placement_of(Engine()).device == torch.device("cpu")
    e = Engine()
    e.condmoe_placement = Placement(torch.device("cuda", 0), GPU_BACKEND, "cuda")
    assert placement_of(e).is_cuda


def test_launch_checks_cluster_gpus_before_ray_train(monkeypatch):
    """A cluster address: after connecting, too few GPUs -> one DeviceError, no TorchTrainer."""
    import ray
    import ray.train.torch

    from condmoe.cluster import launch

    monkeypatch.setattr(launch, "preflight", lambda cfg, resume=None, address=None: None)
    monkeypatch.setattr(launch, "_init_ray", lambda cfg, address: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 1.0})

    def no_trainer(*a, **k):
        raise AssertionError("TorchTrainer started on a cluster without the GPUs")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "RAY_TRAIN_V2_ENABLED")}
    try:
        with pytest.raises(DeviceError, match="cluster.workers=2 but the Ray cluster at 10.1.2.3:6379 has 1 GPUs"):
            launch.launch(_job(use_gpu=True, workers=2), address="10.1.2.3:6379")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _no_gpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DS_ACCELERATOR")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def test_cli_use_gpu_without_gpus_fails_before_ray(fmnist_shards, tmp_path):
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    p = subprocess.run([str(Path(sys.executable).parent / "condmoe"), "train", str(ROOT / "configs/condconv.yaml"),
                        "--set", "cluster.use_gpu=true", "--set", f"data.path={fmnist_shards}",
                        "--set", f"cluster.storage_path={runs}"],
                       env=_no_gpu_env(), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(err) == 1 and "GPU" in err[0] and err[0].startswith("condmoe train: error:"), p.stderr
    assert "ray" not in p.stdout.lower() and not runs.exists()  # nothing started, nothing written
    assert took < 60, took


def test_module_entry_use_gpu_without_gpus(fmnist_shards, tmp_path):
    p = subprocess.run([sys.executable, "-m", "condmoe.trainer", str(ROOT / "configs/cigt.yaml"),
                        "--set", "cluster.use_gpu=true", "--set", f"data.path={fmnist_shards}",
                        "--set", f"cluster.storage_path={tmp_path}"],
                       env=_no_gpu_env(), capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "no usable CUDA GPU" in err[0], p.stderr[-2000:]
