"""Run a job on Ray: JobConfig -> ray.train.torch.TorchTrainer.

ScalingConfig (workers, CPUs/GPUs each), RunConfig(storage_path, name) and
FailureConfig(max_failures) come from the job's cluster section. With no
address an embedded local Ray is started (the laptop case). Each worker runs
condmoe.trainer.loop.train with the job's sinks (condmoe.cluster.sinks: jsonl,
Parquet, Prometheus, and Ray Train's report, which receives each checkpoint
the loop wrote, already inside the run directory, so nothing is copied). After a worker failure Ray restarts the group and the
workers resume from the newest complete checkpoint.

With ``cluster.storage_path: s3://bucket/prefix`` Ray Train keeps its run state
there (RunConfig(storage_filesystem=) gets condmoe's pyarrow S3 filesystem), the
workers upload each checkpoint themselves and commit it with meta.json
(trainer/storage.py), and Ray Train is told of it without a copy; logs stay in
a local folder per node (storage.local_dir) and are copied to ``<run>/logs/``.
The preflight writes a probe object there first, so a bad bucket, endpoint or
credentials fail in one line before Ray starts.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from condmoe.datasets.urls import filesystem, is_pattern, is_s3, local_path
from condmoe.trainer.checkpoint import resolve_checkpoint
from condmoe.trainer.storage import StorageError, check_writable
from condmoe.trainer.config import ConfigError, JobConfig, job_from_dict
from condmoe.trainer.device import (GPU_IDS_ENV, DeviceError, accelerator_name, process_group_backend,
                                    require_cluster_gpus, require_local_gpus)

log = logging.getLogger(__name__)

# env every worker needs; DS_ACCELERATOR (DeepSpeed reads it at its import) follows cluster.use_gpu
_WORKER_ENV = {"RAY_TRAIN_V2_ENABLED": "1"}
# the driver builds the model once on CPU (preflight) and never needs a GPU
_DRIVER_ENV = {**_WORKER_ENV, "DS_ACCELERATOR": "cpu"}


@dataclass
class LaunchResult:
    """What a finished ``condmoe train`` returns."""

    metrics: dict[str, Any]
    checkpoint: Path | None
    run_dir: Path
    error: str | None = None
    exporter_url: str | None = None


def check_address(address: str, timeout: float = 3.0) -> None:
    """Raise ConnectionError naming ``address`` unless a TCP connection to it succeeds."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ValueError(f"Ray address {address!r} must be HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"Ray address {address!r} is unreachable: {exc.strerror or exc}") from None


def check_data(cfg: JobConfig) -> None:
    """Raise FileNotFoundError when the job's shard directory (local or s3://) is missing or incomplete."""
    path = cfg.data.path
    if is_s3(path) and not is_pattern(path) and not path.endswith(".tar"):  # a shard set on S3: its manifest
        from condmoe.datasets import read_manifest

        try:
            read_manifest(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"data.path {path!r} holds no manifest.parquet (no complete shard set; "
                                    f"write one: condmoe shards write fashion_mnist {path})") from None
        except OSError as exc:
            raise StorageError(f"data.path {path!r}: {' '.join(str(exc).split())[:300]}") from None
        return
    p = local_path(path)  # None for pipe:, scheme:// URLs and shard patterns: the workers open those
    if p is None:
        return
    if not p.exists():
        raise FileNotFoundError(
            f"data.path {path!r} does not exist (write shards first: condmoe shards write fashion_mnist {path})")
    if p.is_dir() and not (p / "manifest.parquet").is_file():
        raise FileNotFoundError(f"data.path {path!r} holds no manifest.parquet (not a shard directory)")


def check_storage(cfg: JobConfig) -> None:
    """An s3:// run or checkpoint root must take a write: a one-line StorageError naming the URL
    (unknown bucket, no or wrong credentials, unreachable endpoint) before anything starts."""
    for url in dict.fromkeys(u for u in (cfg.run_url, str(cfg.checkpoint_dir)) if is_s3(u)):
        check_writable(url)


def preflight(cfg: JobConfig, *, resume: str | None = None, address: str | None = None) -> str | None:
    """Validate everything a launch needs before starting anything; returns the resolved resume path."""
    # the job's storage: section (endpoint, region, profile) for this process's own S3 calls: these
    # checks and Ray Train's storage; the workers get it through worker_env
    os.environ.update(cfg.storage.env())
    cfg.check_topology(cfg.cluster.workers)
    if cfg.cluster.use_gpu and cfg.cluster.gpu_check and not address:
        require_local_gpus(cfg.cluster.workers)  # the embedded Ray gets this machine's GPUs
    from condmoe.trainer.engine import check_model  # builds the model: a bad option fails before Ray

    check_model(cfg, cfg.cluster.workers)
    check_data(cfg)
    check_storage(cfg)
    if address:
        check_address(address)
    resolved = str(resolve_checkpoint(resume)) if resume else None
    return resolved


def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry: run the one train loop, reporting to Ray Train."""
    import ray.train

    from condmoe.cluster.ray_logs import quiet_train_reports
    from condmoe.cluster.sinks import job_sinks
    from condmoe.trainer.loop import train

    quiet_train_reports()  # Ray Train's line per report stays out of the terminal unless -v
    cfg = job_from_dict(config["job"], source="<job>")
    ray_ckpt = ray.train.get_checkpoint()
    resume = config.get("resume")
    if ray_ckpt is not None:  # after a restart; the run's own newest checkpoint still wins
        resume = ray_ckpt.path if ray_ckpt.filesystem.type_name == "local" else f"s3://{ray_ckpt.path}"
    rank = ray.train.get_context().get_world_rank()
    if cfg.cluster.use_gpu:  # this worker's GPU as Ray assigned it (trainer/device.py looks it up)
        os.environ[GPU_IDS_ENV] = ",".join(str(i) for i in ray.get_gpu_ids())
    train(cfg, sinks=job_sinks(cfg, rank, ray_train=True), resume=resume)


def worker_env(cfg: JobConfig) -> dict[str, str]:
    """Environment of the job's training workers: cluster.env over condmoe's defaults, then DeepSpeed's
    accelerator (``cuda`` with cluster.use_gpu, else ``cpu``)."""
    return {**cfg.cluster.worker_env(), **cfg.storage.env(), **_WORKER_ENV,
            "DS_ACCELERATOR": accelerator_name(cfg.cluster.use_gpu)}


def _init_ray(cfg: JobConfig, address: str | None) -> bool:
    """Connect to ``address`` or start an embedded local Ray; returns True if we started it."""
    import ray

    env = {"env_vars": worker_env(cfg)}  # the same as the workers' own: Ray's pooled workers fit
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return True
    # address="local": always a fresh embedded instance, never a cluster that happens to run here
    need = max(2, int(cfg.cluster.workers * cfg.cluster.cpus_per_worker + 1))
    # with the dashboard (127.0.0.1): Ray Train's placement-group cleaner polls the State API it
    # serves, and warns every second without it
    ctx = ray.init(address="local", num_cpus=need, include_dashboard=True, runtime_env=env,
                   log_to_driver=True, configure_logging=False)
    if ctx.dashboard_url:
        log.info("embedded Ray dashboard: http://%s", ctx.dashboard_url)
    return True


def launch(cfg: JobConfig, *, resume: str | None = None, address: str | None = None) -> LaunchResult:
    """Train ``cfg`` on Ray (embedded when no address); blocks until the run ends."""
    # inside a Ray job (condmoe submit) RAY_ADDRESS names the cluster
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    resume = preflight(cfg, resume=resume, address=address)
    os.environ.update(_DRIVER_ENV)
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from condmoe.cluster.exporter_hosts import start_job_exporter

    started = _init_ray(cfg, address)
    if cfg.cluster.use_gpu and cfg.cluster.gpu_check:
        try:  # before the exporter and Ray Train start: a cluster without the GPUs fails in one line
            require_cluster_gpus(cfg.cluster.workers, ray.cluster_resources(), address or "the embedded Ray")
        except DeviceError:
            if started:
                ray.shutdown()
            raise
    exporter = start_job_exporter(cfg)  # one Prometheus exporter per job (head node); logs its URL
    try:
        cl = cfg.cluster
        resources = {"CPU": cl.cpus_per_worker}
        if cl.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"job": cfg.model_dump(mode="json"), "resume": resume},
            torch_config=TorchConfig(backend=process_group_backend(cl.use_gpu),
                                     timeout_s=int(cl.timeout_s)),
            scaling_config=ScalingConfig(num_workers=cl.workers, use_gpu=cl.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=cfg.run_name, **_ray_storage(cfg),
                                 failure_config=FailureConfig(max_failures=cl.max_failures),
                                 worker_runtime_env={"env_vars": worker_env(cfg)}),
        )
        result = trainer.fit()
        ckpt = _checkpoint_location(result.checkpoint)
        err = repr(result.error) if getattr(result, "error", None) else None
        return LaunchResult(metrics=dict(result.metrics or {}), checkpoint=ckpt,
                            run_dir=cfg.run_dir, error=err, exporter_url=exporter.url)
    finally:
        exporter.stop()
        if started:
            ray.shutdown()


def _ray_storage(cfg: JobConfig) -> dict:
    """RunConfig's storage: the local path, or for s3:// the bucket/prefix on condmoe's S3 filesystem (the
    job's endpoint and region, no credentials inside), so Ray Train's run state and the checkpoints it is
    told of (cluster/sinks.py) share one filesystem."""
    if not cfg.remote_storage:
        return {"storage_path": cfg.cluster.storage_path}
    fs, path = filesystem(cfg.cluster.storage_path)
    return {"storage_path": path, "storage_filesystem": fs}


def _checkpoint_location(ckpt) -> Path | str | None:
    """A ray.train.Checkpoint as condmoe names it: a local Path or an s3:// URL."""
    if ckpt is None:
        return None
    return Path(ckpt.path) if ckpt.filesystem.type_name == "local" else f"s3://{ckpt.path}"


def load_and_launch(path: str, overrides: list[str] | None = None, *, resume: str | None = None,
                    address: str | None = None) -> LaunchResult:
    """``condmoe train``: load + validate the job file, then :func:`launch`."""
    from condmoe.trainer.config import load_job

    cfg = load_job(path, overrides)
    if not cfg.run_name:
        raise ConfigError(f"{path}: cluster.name is empty")
    return launch(cfg, resume=resume, address=address)
