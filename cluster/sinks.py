"""The sinks a job's records go to, and which ones a job gets (:func:`job_sinks`).

The train loop (condmoe.trainer.loop) emits typed records to a list of sinks
on every rank. Besides the jsonl log every run writes, a job under condmoe's
launcher gets:

- :class:`condmoe.cluster.parquet_log.ParquetLog` (rank 0): one row per step
  and routed layer, all ranks summed;
- :class:`PrometheusSink` (every rank under Ray, rank 0 without): pushes to the
  job's exporter, a Ray actor on the head node or a child process of rank 0,
  every ``metrics.prometheus.every_n_steps`` steps. Rank 0 sends the all-rank
  aggregate (steps, loss, routing, step and checkpoint times); every rank sends
  its own data waits and skipped samples. The RoutingStats travel as they are:
  one pickle into the exporter's process.
- :class:`RayTrainSink` (every rank, under Ray Train): hands each checkpoint
  (already inside the run directory, nothing is copied) and the latest scalars
  to ``ray.train.report``, which every rank calls equally often. On S3 the
  checkpoint is named on Ray Train's own storage filesystem.
- :class:`LogUploadSink` (every rank, with an s3:// storage_path): copies the
  local logs to ``<run>/logs/`` on S3 at each checkpoint and at the end.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from condmoe.routing import accumulate_stats
from condmoe.trainer.config import JobConfig
from condmoe.trainer.storage import is_remote
from condmoe.trainer.loop import default_sinks
from condmoe.trainer.records import (CheckpointRecord, EvalRecord, MetricsSink, Record, RestartRecord, StepRecord,
                                     StopRecord)

from .exporter_hosts import ExporterProcess, find_job_exporter
from .parquet_log import ParquetLog

log = logging.getLogger(__name__)

Push = Callable[[dict, bool], None]  # (update, wait until delivered)


class PrometheusSink:
    """Feeds the job's exporter (see condmoe.cluster.metrics for the update's keys)."""

    def __init__(self, cfg: JobConfig, rank: int, push: Push, *, attach: Callable[[str], bool] | None = None,
                 on_close: Callable[[], None] | None = None, url: str | None = None) -> None:
        self.rank, self.every, self.batch_size = rank, cfg.metrics.prometheus.every_n_steps, cfg.data.batch_size
        self.url = url
        self._push, self._attach, self._on_close = push, attach, on_close
        self._pushed_step: int | None = None
        self._failed = False
        self._new()

    def _new(self) -> None:
        self._update: dict[str, Any] = {"data_wait_seconds": [], "bad_samples": {}}
        if self.rank == 0:
            self._update.update({"steps": 0, "samples": 0, "routing": {}, "step_seconds": [],
                                 "checkpoint_seconds": []})

    def write(self, record: Record) -> None:
        u = self._update
        if isinstance(record, RestartRecord):
            self._pushed_step = record.step
            if self.rank == 0 and self._attach is not None and self._attach(uuid.uuid4().hex):
                log.info("worker group restarted (resuming at step %d)", record.step)
            if self.rank == 0:
                u["world_size"] = record.world_size
                self._send(record.step)
            return
        if isinstance(record, StopRecord):
            if self.rank == 0:
                u["stops"] = [record.reason]
                self._send(record.step, wait=True)  # the worker may be gone soon
            return
        if isinstance(record, StepRecord):
            u["data_wait_seconds"] += record.data_wait_seconds
            for reason, n in record.bad_samples.items():
                u["bad_samples"][reason] = u["bad_samples"].get(reason, 0) + n
            if self.rank == 0:
                u.update(step=record.step, loss=record.loss, steps=u["steps"] + record.steps,
                         samples=u["samples"] + record.steps * self.batch_size,
                         routing=accumulate_stats(u["routing"], record.routing))
                u["step_seconds"] += record.step_seconds
            if record.step - (self._pushed_step or 0) >= self.every:
                self._send(record.step)
        elif isinstance(record, EvalRecord):
            if self.rank == 0:
                u["eval_accuracy"] = record.accuracy
                self._send(record.step)
        elif isinstance(record, CheckpointRecord):
            if self.rank == 0 and record.seconds > 0:
                u["checkpoint_seconds"].append(record.seconds)
            self._send(record.step)

    def _send(self, step: int, wait: bool = False) -> None:
        update, self._pushed_step = self._update, step
        self._new()
        if self._failed:
            return
        try:
            self._push(update, wait)
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training; said once
            self._failed = True
            log.warning("rank %d: metrics export stopped: %s", self.rank, exc)

    def close(self) -> None:
        try:
            self._send(self._pushed_step or 0, wait=True)
        finally:
            if self._on_close is not None:
                self._on_close()


ATTEMPT_LINE = "condmoe attempt: {world} workers from step {step} at {time:.1f}"
ATTEMPT_RE = r"condmoe attempt: (\d+) workers from step (\d+) at ([0-9.]+)"


class AttemptLogSink:
    """Rank 0 logs one line per attempt of the worker group (:data:`ATTEMPT_LINE`): the job's logs then
    hold its world size over time, which ``condmoe status`` reads (condmoe.cluster.jobs.worker_history)
    wherever the Jobs API answers, without the run directory or the exporter."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def write(self, record: Record) -> None:
        if self.rank == 0 and isinstance(record, RestartRecord):
            log.info(ATTEMPT_LINE.format(world=record.world_size, step=record.step, time=record.time))

    def close(self) -> None:
        pass


class RayTrainSink:
    """Checkpoints (and the scalars of the latest step and evaluation) to ``ray.train.report``."""

    def __init__(self, cfg: JobConfig) -> None:
        self.run_dir = cfg.run_dir
        self._scalars: dict[str, Any] = {}

    def write(self, record: Record) -> None:
        if isinstance(record, StepRecord):
            self._scalars.update(step=record.step, loss=record.loss, lr=record.lr, epoch=record.epoch,
                                 samples_per_s=record.samples_per_s, first_step_time=record.first_step_time)
        elif isinstance(record, EvalRecord):
            self._scalars.update(record.as_metrics())
        elif isinstance(record, CheckpointRecord):
            # ray.train.report is a barrier through the controller (~seconds on a busy CPU), so only
            # checkpoints go to Ray Train; every step is in metrics.jsonl and the Parquet log
            import ray.train
            from ray.train import Checkpoint
            from ray.train.v2.api.report_config import CheckpointUploadMode

            self._scalars.update(step=record.step, checkpoint_step=record.step)
            ckpt = None
            if record.path is not None and is_remote(record.path):
                ckpt = _stored_checkpoint(str(record.path))
            elif record.path is not None and Path(record.path).is_relative_to(self.run_dir):
                ckpt = Checkpoint(str(record.path))
            ray.train.report(dict(self._scalars), checkpoint=ckpt,
                             checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def close(self) -> None:
        pass


def _stored_checkpoint(url: str):
    """A checkpoint already on Ray Train's storage (s3://, committed by trainer/checkpoint.py) as a
    ray.train.Checkpoint on the run's own storage filesystem, so Ray Train manages it as uploaded
    (NO_UPLOAD); None when it lies outside the run's storage (e.g. checkpoint.dir elsewhere)."""
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context().get_storage()
    path = url.split("://", 1)[1]
    if not path.startswith(ctx.experiment_fs_path.rstrip("/") + "/"):
        return None
    return Checkpoint(path, filesystem=ctx.storage_filesystem)


class LogUploadSink:
    """With an ``s3://`` storage_path: the run's local logs go to ``<storage_path>/<run>/logs/`` at
    every checkpoint and at the end (rank 0: metrics.jsonl and monitor/; each rank: its keys file),
    each file only when it changed. A failed upload is logged, never raised: logs never stop training."""

    def __init__(self, cfg: JobConfig, rank: int) -> None:
        self.local, self.url, self.rank = cfg.run_dir, f"{cfg.run_url}/logs", rank
        self._sent: dict[Path, tuple[int, int]] = {}

    def _files(self) -> list[Path]:
        files = [self.local / "keys" / f"rank{self.rank}.jsonl"]
        if self.rank == 0:
            files += [self.local / "metrics.jsonl", *sorted((self.local / "monitor").rglob("*.parquet"))]
        return [f for f in files if f.is_file()]

    def sync(self) -> None:
        from condmoe.trainer import storage

        for f in self._files():
            st = f.stat()
            if self._sent.get(f) == (st.st_size, st.st_mtime_ns):
                continue
            try:
                storage.write_bytes(f"{self.url}/{f.relative_to(self.local).as_posix()}", f.read_bytes())
            except OSError as exc:
                log.warning("rank %d: log upload stopped: %s", self.rank, exc)
                return
            self._sent[f] = (st.st_size, st.st_mtime_ns)

    def write(self, record: Record) -> None:
        if isinstance(record, CheckpointRecord):
            self.sync()

    def close(self) -> None:
        self.sync()


def _local_prometheus(cfg: JobConfig, rank: int, exporter: ExporterProcess | None = None) -> PrometheusSink | None:
    """No Ray: rank 0 serves the exporter in a child process (other ranks export nothing).

    ``exporter``: one already running to feed instead (its owner stops it).
    """
    prom = cfg.metrics.prometheus
    if rank != 0 or not prom.enabled:
        return None
    owned = exporter is None
    if owned:
        exporter = ExporterProcess(cfg.run_name, prom.host, prom.port)
        try:
            exporter.start()
        except (OSError, TimeoutError) as exc:  # monitoring must never stop training
            log.warning("job %s: no metrics exporter: %s", cfg.run_name, exc)
            return None
    return PrometheusSink(cfg, rank, lambda u, _wait: exporter.update(u),
                          on_close=exporter.stop if owned else None, url=exporter.url)


def _ray_prometheus(cfg: JobConfig, rank: int) -> PrometheusSink | None:
    """Under Ray: push to the job's exporter actor (started by the driver), else serve locally."""
    import ray

    actor = find_job_exporter(cfg.run_name) if cfg.metrics.prometheus.enabled else None
    if actor is None:
        if cfg.metrics.prometheus.enabled and rank == 0:
            log.info("no exporter actor for job %s: rank 0 serves the metrics itself", cfg.run_name)
        return _local_prometheus(cfg, rank)

    def push(update: dict, wait: bool) -> None:
        ref = actor.update.remote(update)
        if wait:
            ray.get(ref, timeout=30)

    def attach(session: str) -> bool:
        try:
            return bool(ray.get(actor.attach.remote(session), timeout=30))
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
            log.warning("exporter of job %s unreachable: %s", cfg.run_name, exc)
            return False

    return PrometheusSink(cfg, rank, push, attach=attach)


def job_sinks(cfg: JobConfig, rank: int, *, ray_train: bool,
              exporter: ExporterProcess | None = None) -> list[MetricsSink]:
    """The sinks of one worker of a job: jsonl (rank 0), Parquet (rank 0), Prometheus, Ray Train.

    exporter: without Ray, a running exporter for rank 0 to feed instead of starting its own.
    """
    sinks: list[MetricsSink] = default_sinks(cfg, rank)
    if rank == 0:
        sinks.append(ParquetLog(cfg.run_dir))
    prom = _ray_prometheus(cfg, rank) if ray_train else _local_prometheus(cfg, rank, exporter)
    if prom is not None:
        sinks.append(prom)
    if ray_train:
        sinks += [RayTrainSink(cfg), AttemptLogSink(rank)]
    if cfg.remote_storage:  # after the log writers: their lines of a record are on disk when it syncs
        sinks.append(LogUploadSink(cfg, rank))
    return sinks

