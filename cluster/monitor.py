"""Worker-side monitoring hooks for the one train loop (no change to the loop itself).

:class:`JobMonitor` gives ``condmoe.trainer.loop.train`` three things it
already accepts: a ``report`` wrapper (rank 0 appends every report to the
run's Parquet log and pushes the all-rank routing aggregate to the job's
exporter every ``metrics.prometheus.every_n_steps`` steps), an ``on_step``
hook (step wall time on rank 0) and a ``loader_factory`` whose loaders time
how long each rank waits for its next batch and whose skipped-bad-sample
counts are forwarded by reason.

Step time runs from the end of one step (or of its report, so evaluation and
checkpointing are excluded) to the next ``on_step``. Checkpoint duration is
measured from outside the loop: from the end of the step (or of the
evaluation that precedes the save) to the report that carries the path.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


from condmoe.routing import RoutingStats, accumulate_stats

from .exporter_hosts import ExporterProcess, find_job_exporter
from .parquet_log import ParquetLog

log = logging.getLogger(__name__)

Push = Callable[[dict, bool], None]  # (update, wait until delivered)


class _TimedLoader:
    """Wraps a loader: data-wait per batch (train) or the end time of an evaluation pass (eval)."""

    def __init__(self, inner: Any, monitor: "JobMonitor", train: bool) -> None:
        self.inner, self.monitor, self.train = inner, monitor, train

    def __iter__(self):
        m = self.monitor
        if not self.train:
            try:
                yield from self.inner
            finally:
                m._eval_end = time.perf_counter()
            return
        it = None
        while True:
            t0 = time.perf_counter()
            if m._t_mark is None:
                m._t_mark = t0
            if it is None:
                it = iter(self.inner)
            try:
                batch = next(it)
            except StopIteration:
                return
            m._waits.append(time.perf_counter() - t0)
            yield batch

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class JobMonitor:
    """Hooks of one worker; use as a context manager around ``train(...)``."""

    def __init__(self, cfg, rank: int, push: Push | None, report: Callable | None = None, *,
                 parquet: bool | None = None, on_close: Callable[[], None] | None = None) -> None:
        self.cfg, self.rank = cfg, int(rank)
        self._push, self._downstream, self._on_close = push, report, on_close
        self.every = cfg.metrics.prometheus.every_n_steps
        self.parquet = ParquetLog(cfg.run_dir) if (rank == 0 if parquet is None else parquet) else None
        self._t_mark: float | None = None   # start of the current step
        self._step_end: float | None = None  # when on_step of the current step ran
        self._eval_end: float | None = None
        self._waits: list[float] = []
        self._step_times: list[float] = []
        self._ckpt_times: list[float] = []
        self._routing: dict[str, RoutingStats] = {}
        self._prev_step: int | None = None
        self._pushed_step: int | None = None
        self._bad_sent: dict[str, int] = {}
        self._bad_source: Any = None
        self._pending_steps = 0
        self._failed = False
        self.exporter: ExporterProcess | None = None  # set when this process serves the metrics

    # --- hooks handed to train()
    def loader_factory(self, cfg, split: str, batch_size: int, rank: int, world: int, train: bool):
        from condmoe.trainer.loop import streaming_loader

        loader = _TimedLoader(streaming_loader(cfg, split, batch_size, rank, world, train), self, train)
        if train:
            self._bad_source = loader.inner
        return loader

    def on_step(self, step: int) -> None:
        now = time.perf_counter()
        if self._prev_step is None:
            self._prev_step = step - 1
            if self.parquet is not None:
                self.parquet.set_first_step(step - 1)
        if self.rank == 0 and self._t_mark is not None:
            self._step_times.append(now - self._t_mark)
        self._t_mark = self._step_end = now

    def report(self, metrics: dict, path: Path | None = None) -> None:
        now = time.perf_counter()
        step = int(metrics["step"])
        if path is not None and self._step_end is not None:
            start = max(self._step_end, self._eval_end or 0.0) if "eval_accuracy" in metrics else self._step_end
            self._ckpt_times.append(now - start)
        if self.parquet is not None:
            self.parquet.add(metrics, path)
        for name, d in (metrics.get("routing") or {}).items():
            s = RoutingStats.from_dict(d)
            self._routing = accumulate_stats(self._routing, {name: s})
        prev = self._prev_step if self._prev_step is not None else step - 1
        self._pending_steps += max(0, step - prev)
        self._prev_step = step
        final = step >= self.cfg.optim.steps
        base = self._pushed_step if self._pushed_step is not None else prev
        if final or path is not None or step - base >= self.every:
            self._send(metrics, step, final)
        if self._downstream is not None:
            self._downstream(metrics, path)
        self._t_mark = time.perf_counter()  # the next step starts after this report

    # --- pushing
    def _bad_delta(self) -> dict[str, int]:
        counts = dict(getattr(self._bad_source, "bad_samples", None) or {})
        delta = {str(k): int(v) - self._bad_sent.get(str(k), 0) for k, v in counts.items()}
        self._bad_sent = {str(k): int(v) for k, v in counts.items()}
        return {k: v for k, v in delta.items() if v > 0}

    def _send(self, metrics: dict, step: int, final: bool) -> None:
        update: dict[str, Any] = {"data_wait_seconds": self._waits, "bad_samples": self._bad_delta()}
        if self.rank == 0:
            update.update({
                "step": step, "steps": self._pending_steps,
                "samples": self._pending_steps * self.cfg.data.batch_size,
                "loss": metrics.get("loss"), "eval_accuracy": metrics.get("eval_accuracy"),
                "routing": {n: s.as_dict() for n, s in self._routing.items()},
                "step_seconds": self._step_times, "checkpoint_seconds": self._ckpt_times})
        self._waits, self._step_times, self._ckpt_times, self._routing = [], [], [], {}
        self._pending_steps, self._pushed_step = 0, step
        if self._push is None or self._failed:
            return
        try:
            self._push(update, final)
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
            self._failed = True
            log.warning("rank %d: metrics export stopped: %s", self.rank, exc)

    # --- lifetime
    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.flush()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> "JobMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def local_monitor(cfg, rank: int, report: Callable | None = None) -> JobMonitor:
    """No Ray: rank 0 starts the exporter in a child process (other ranks only time, no export)."""
    prom = cfg.metrics.prometheus
    if rank != 0 or not prom.enabled:
        return JobMonitor(cfg, rank, None, report)
    exporter = ExporterProcess(cfg.run_name, prom.host, prom.port)
    try:
        exporter.start()
    except (OSError, TimeoutError) as exc:  # monitoring must never stop training
        log.warning("job %s: no metrics exporter: %s", cfg.run_name, exc)
        return JobMonitor(cfg, rank, None, report)
    monitor = JobMonitor(cfg, rank, lambda u, _final: exporter.update(u), report, on_close=exporter.stop)
    monitor.exporter = exporter
    return monitor


def worker_monitor(cfg, report: Callable | None = None) -> JobMonitor:
    """Under Ray Train: push to the job's exporter actor (started by the driver), else act as local."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    actor = find_job_exporter(cfg.run_name) if cfg.metrics.prometheus.enabled else None
    if actor is None:
        if cfg.metrics.prometheus.enabled and rank == 0:
            log.info("no exporter actor for job %s: rank 0 serves the metrics itself", cfg.run_name)
        return local_monitor(cfg, rank, report)
    if rank == 0:
        try:
            if ray.get(actor.attach.remote(uuid.uuid4().hex), timeout=30):
                log.info("job %s: worker group restarted", cfg.run_name)
        except Exception as exc:  # noqa: BLE001
            log.warning("exporter of job %s unreachable: %s", cfg.run_name, exc)

    def push(update: dict, final: bool) -> None:
        ref = actor.update.remote(update)
        if final:
            ray.get(ref, timeout=30)

    return JobMonitor(cfg, rank, push, report)
