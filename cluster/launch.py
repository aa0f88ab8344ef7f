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

``cluster.workers: [min, max]`` makes the ScalingConfig elastic: Ray Train starts
as many workers as fit and restarts the group at another size when nodes leave or
join; each attempt resumes from the newest checkpoint through the portable path
with its world's ep_size and gradient accumulation (JobConfig.for_world).
SIGTERM to a worker, a drain of its node, or SIGTERM / Ctrl-C to this driver make
the workers checkpoint at the next step and stop (condmoe.cluster.preempt); the
driver then shuts down the controller, the exporter and an embedded Ray, and ends
every process that embedded Ray started.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
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
    stopped: str | None = None  # SIGTERM / SIGINT: condmoe train was stopped (checkpoint at the last step)


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
    for world in cfg.cluster.world_sizes():  # an elastic job may run on any of them
        cfg.check_topology(world)
    if cfg.cluster.use_gpu and cfg.cluster.gpu_check and not address:
        require_local_gpus(cfg.cluster.min_workers)  # the embedded Ray gets this machine's GPUs
    from condmoe.trainer.engine import check_model  # builds the model: a bad option fails before Ray

    check_model(cfg, cfg.cluster.max_workers)
    check_data(cfg)
    check_storage(cfg)
    if address:
        check_address(address)
    resolved = str(resolve_checkpoint(resume)) if resume else None
    return resolved


def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry: run the one train loop, reporting to Ray Train."""
    import ray.train

    from condmoe.cluster.preempt import Preempted, WorkerStop
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
    with WorkerStop(config.get("stop_key"), cfg.cluster.preempt_grace_s) as stop:
        res = train(cfg, sinks=job_sinks(cfg, rank, ray_train=True), resume=resume, stop=stop)
    if res.stopped == "preempt":  # an error, so Ray Train restarts the group: it resumes at res.checkpoint
        raise Preempted(f"preempted after step {res.step} (checkpoint {res.checkpoint}); restarting")


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
    need = max(2, int(cfg.cluster.max_workers * cfg.cluster.cpus_per_worker + 1))
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
    # Ray Train's controller reads it from the driver's environment: how long a worker group may wait for
    # its resources (after a node loss an elastic job retries with the workers that fit)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.cluster.start_timeout_s)
    import ray

    from condmoe.cluster.exporter_hosts import start_job_exporter

    before = _descendants()
    started = _init_ray(cfg, address)
    if cfg.cluster.use_gpu and cfg.cluster.gpu_check:
        try:  # before the exporter and Ray Train start: a cluster without the GPUs fails in one line
            require_cluster_gpus(cfg.cluster.min_workers, ray.cluster_resources(), address or "the embedded Ray")
        except DeviceError:
            if started:
                ray.shutdown()
            raise
    exporter = start_job_exporter(cfg)  # one Prometheus exporter per job (head node); logs its URL
    from condmoe.cluster.preempt import DriverSignals, clear_stop, stop_key, wait_for_fit

    key = stop_key(cfg.run_name, uuid.uuid4().hex)
    outcome = None
    try:
        drop_ray_train_snapshot(cfg)
        trainer = _trainer(cfg, resume, key)
        with DriverSignals() as signals:  # SIGTERM / Ctrl-C: checkpoint at the next step, then stop
            outcome = wait_for_fit(trainer.fit, signals, key, cfg.cluster.preempt_grace_s)
        if outcome.error is not None and not outcome.signal:
            raise outcome.error
        result = outcome.result
        if result is None:  # stopped, and the workers failed or did not return in time
            why = repr(outcome.error) if outcome.error else "the workers did not stop in time"
            return LaunchResult(metrics={}, checkpoint=None, run_dir=cfg.run_dir, exporter_url=exporter.url,
                                stopped=outcome.signal, error=why)
        ckpt = _checkpoint_location(result.checkpoint)
        err = repr(result.error) if getattr(result, "error", None) else None
        return LaunchResult(metrics=dict(result.metrics or {}), checkpoint=ckpt, run_dir=cfg.run_dir,
                            error=err, exporter_url=exporter.url, stopped=outcome.signal or None)
    finally:
        stopping = outcome is not None and bool(outcome.signal)
        exporter.stop(final_scrape_timeout_s=2.0 if stopping else 15.0)
        clear_stop(key)
        if started:
            ours = [p for p in _descendants() if p.pid not in before]
            ray.shutdown()
            _end_processes(ours)  # what the embedded Ray started and its shutdown left running


def _trainer(cfg: JobConfig, resume: str | None, key: str):
    """The job's TorchTrainer: fixed or elastic ScalingConfig, condmoe's stop handling on every worker."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from condmoe.cluster.preempt import StopTorchConfig

    cl = cfg.cluster
    resources = {"CPU": cl.cpus_per_worker, **cl.resources_per_worker}
    if cl.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "resume": resume, "stop_key": key},
        torch_config=StopTorchConfig(backend=process_group_backend(cl.use_gpu), timeout_s=int(cl.timeout_s),
                                     grace_s=cl.preempt_grace_s),
        scaling_config=ScalingConfig(num_workers=cl.workers, use_gpu=cl.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=cl.resize_interval_s),
        run_config=RunConfig(name=cfg.run_name, **_ray_storage(cfg),
                             failure_config=FailureConfig(max_failures=cl.max_failures),
                             worker_runtime_env={"env_vars": worker_env(cfg)}),
    )


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's run state, in RunConfig's storage


def drop_ray_train_snapshot(cfg: JobConfig) -> bool:
    """Remove Ray Train's run snapshot left by an earlier driver of this run; True if there was one.

    Ray Train V2 keeps the checkpoints reported to it in ``<storage>/<run>/checkpoint_manager_snapshot.json``
    and refuses to start ("a reference to a checkpoint that does not exist anymore") when one of them is
    gone, which condmoe's keep-last-K pruning does: a driver killed after a save pruned the oldest and
    before the next report rewrote the snapshot leaves a run that can never be started again. condmoe
    resumes from the run's own newest committed checkpoint (trainer/loop.py), so the snapshot holds
    nothing a new driver needs; within one fit Ray Train keeps its state in memory.
    """
    from condmoe.trainer import storage

    if cfg.remote_storage:
        url = storage.join(str(cfg.cluster.storage_path), cfg.run_name, RAY_TRAIN_SNAPSHOT)
        if not storage.exists(url):
            return False
        storage.delete_file(url)
    else:
        path = cfg.run_dir / RAY_TRAIN_SNAPSHOT  # local storage: the run dir is Ray Train's experiment dir
        if not path.exists():
            return False
        path.unlink()
    log.info("run %s: Ray Train's snapshot of an earlier driver removed; resuming from the run's own "
             "newest checkpoint", cfg.run_name)
    return True


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


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _end_processes(procs: list, timeout_s: float = 10.0) -> None:
    """Wait for ``procs`` (psutil) to exit, then SIGTERM and SIGKILL what is left; logs what it ended."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for sig in ("terminate", "kill"):
        if not alive:
            return
        log.info("ending %d leftover process(es) of the embedded Ray: %s", len(alive),
                 ", ".join(str(p.pid) for p in alive))
        for proc in alive:
            try:
                getattr(proc, sig)()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5.0)


def load_and_launch(path: str, overrides: list[str] | None = None, *, resume: str | None = None,
                    address: str | None = None) -> LaunchResult:
    """``condmoe train``: load + validate the job file, then :func:`launch`."""
    from condmoe.trainer.config import load_job

    cfg = load_job(path, overrides)
    if not cfg.run_name:
        raise ConfigError(f"{path}: cluster.name is empty")
    return launch(cfg, resume=resume, address=address)
