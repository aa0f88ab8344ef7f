"""The one train loop every method uses (torchtitan-shaped: build -> resume -> train_step -> log/eval/save).

It runs inside one worker: under Ray Train, under the plain ``deepspeed``
launcher, or in a single test process. It never imports Ray. What it measures
goes out as typed records (condmoe.trainer.records) to the job's sinks; the
caller chooses the sinks (condmoe.cluster adds Parquet, Prometheus and Ray
Train's report to the jsonl log every run has).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from condmoe.routing import RoutingStats, accumulate_stats, collect_routing_stats
from condmoe.routing.macs import count_macs

from .checkpoint import CheckpointManager, resolve_checkpoint
from .config import JobConfig, dump_job
from .device import placement_of
from .ema import WeightEma, build_ema
from .engine import build_engine, setup_distributed
from .records import (CheckpointRecord, EvalRecord, JsonlSink, MetricsSink, Record, RestartRecord, StepRecord,
                      StopRecord)
from .routing_tracker import RoutingTracker, check_finite
from .stop import REASONS, StopSource, agree

log = logging.getLogger(__name__)


class Loader(Protocol):
    """What the loop needs from a reader (condmoe.datasets.StreamingLoader fits)."""

    def __iter__(self) -> Iterator[Any]: ...  # batches with .images (B,C,H,W), .labels (B,), .keys, .valid
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LoaderFactory = Callable[..., Loader]


def streaming_loader(cfg: JobConfig, split: str, batch_size: int, rank: int, world_size: int,
                     train: bool) -> Loader:
    """The default reader: condmoe.datasets.StreamingLoader over the job's shards.

    Training drops the samples that cannot fill a last global batch; evaluation
    pads it (``Batch.valid`` masks the padding), so every image is counted once.
    """
    from condmoe.datasets import StreamingLoader

    return StreamingLoader(cfg.data.path, split, batch_size, rank=rank, world_size=world_size,
                           num_workers=cfg.data.num_workers, seed=cfg.data.seed,
                           augment=cfg.data.augment and train, resolution=cfg.data.resolution,
                           remainder="drop" if train else "pad",
                           pin_memory=cfg.cluster.use_gpu)  # GPU workers: non-blocking copies


def default_sinks(cfg: JobConfig, rank: int) -> list[MetricsSink]:
    """What every run writes, with or without Ray: rank 0's <run dir>/metrics.jsonl."""
    return [JsonlSink(cfg.run_dir / "metrics.jsonl", rank)]


@dataclass
class TrainResult:
    """What a finished run returns (on every rank)."""

    step: int
    losses: dict[int, float] = field(default_factory=dict)   # step -> global mean loss
    eval: dict[str, float] = field(default_factory=dict)
    routing: dict[str, dict] = field(default_factory=dict)   # run totals, all ranks
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    stopped: str | None = None  # "preempt" or "stop" when a stop source ended the run early (StopRecord)


def _allreduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, loader: Loader, *, max_batches: int | None = None, macs_batches: int = 2,
             start_state: dict | None = None, step: int = 0, ema: WeightEma | None = None) -> EvalRecord:
    """Accuracy, multiply-adds per sample (early exits counted) and exit rate over ``loader``.

    Every rank runs the same number of batches (the loader guarantees equal
    lengths), so expert-parallel all-to-alls stay matched; padding of the last
    batch (``batch.valid`` False) is left out, so the whole split counts once.
    ema: evaluate the averaged weights (swapped in, the live ones back after).
    """
    if ema is not None:
        with ema.applied():
            record = evaluate(engine, loader, max_batches=max_batches, macs_batches=macs_batches,
                              start_state=start_state, step=step)
        return dataclasses.replace(record, ema=True)
    module = engine.module
    placement = placement_of(engine)  # the engine's device and input dtype
    was_training = module.training
    module.eval()
    if start_state is not None:
        loader.load_state_dict(start_state)  # the same samples at every evaluation
    correct = total = exited = macs_sum = macs_n = 0.0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = placement.images(batch.images), placement.move(batch.labels)
            valid = (placement.move(batch.valid) if getattr(batch, "valid", None) is not None
                     else torch.ones_like(y, dtype=torch.bool))
            out = engine(x)
            correct += ((out.logits.argmax(-1) == y) & valid).sum().item()
            total += valid.sum().item()
            if out.exited is not None:
                exited += (out.exited & valid).sum().item()
            if i < macs_batches:  # same batches on every rank (count_macs runs the experts' all-to-all)
                rep = count_macs(module, x)
                macs_sum += rep.per_sample * rep.batch_size
                macs_n += rep.batch_size
    finally:
        module.train(was_training)
        collect_routing_stats(module)  # eval routing is not training load
    correct, total, exited, macs_sum, macs_n = _allreduce_sum([correct, total, exited, macs_sum, macs_n])
    return EvalRecord(step=step, accuracy=correct / max(total, 1), samples=int(total),
                      macs_per_sample=macs_sum / max(macs_n, 1), exit_rate=exited / max(total, 1),
                      rank=dist.get_rank() if dist.is_initialized() else 0)


class _Batches:
    """Endless batches over epochs; tracks the epoch for the checkpoint's data position."""

    def __init__(self, loader: Loader, state: dict) -> None:
        self.loader, self.epoch = loader, int(state.get("epoch", 0))
        self.loader.set_epoch(self.epoch)
        if "loader" in state:
            self.loader.load_state_dict(state["loader"])
        self._it: Iterator | None = None

    def next(self):
        for _ in range(3):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                # StreamingLoader moves itself to the next epoch at the end of one; others may not
                if self.loader.state_dict().get("epoch", self.epoch) == self.epoch:
                    self.loader.set_epoch(self.epoch + 1)
                self.epoch = int(self.loader.state_dict().get("epoch", self.epoch + 1))
                self._it = None
        raise RuntimeError("the training loader yields no batches")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}


@dataclass
class _Run:
    """Everything one attempt of a run holds; the loop's functions read and update it."""

    cfg: JobConfig
    rank: int
    world: int
    engine: Any
    batches: _Batches
    eval_loader: Loader
    eval_start: dict
    ckpts: CheckpointManager
    tracker: RoutingTracker
    sinks: Sequence[MetricsSink]
    result: TrainResult
    keys_file: Any = None
    ema: WeightEma | None = None  # optim.ema: updated after each optimiser step, evaluated
    # the current report interval
    reported_step: int = 0
    t_report: float = field(default_factory=time.perf_counter)
    step_seconds: list[float] = field(default_factory=list)
    data_waits: list[float] = field(default_factory=list)
    bad_sent: dict[str, int] = field(default_factory=dict)
    first_step_time: float | None = None

    def emit(self, record: Record) -> None:
        for sink in self.sinks:
            sink.write(record)


def _resume(cfg: JobConfig, engine, ckpts: CheckpointManager, resume, world: int) -> tuple[Path | None, dict]:
    """Load the run's own newest checkpoint, else ``resume``; returns (source, meta) ({} when fresh)."""
    source = ckpts.latest() or (resolve_checkpoint(resume) if resume else None)
    if source is None:
        return None, {}
    meta = ckpts.load(engine, source, world_size=world, ep_size=cfg.model.ep_size)
    log.info("resumed from %s at step %d", source, int(meta["step"]))
    return source, meta


def step_seed(seed: int, step: int, rank: int) -> int:
    """torch's seed for optimiser step ``step`` on ``rank``: a hash of (optim.seed, step, rank).

    Every random draw of a step (dropout masks, CIGT's random routing, noisy gates) is a
    function of it, so a run resumed at step s draws in steps s+1, ... exactly what the
    uninterrupted run drew, with no generator state in the checkpoint; ranks draw independently.
    """
    import numpy as np

    return int(np.random.SeedSequence([seed & (2**64 - 1), step, rank]).generate_state(1, np.uint64)[0] >> 1)


def train_step(run: _Run) -> tuple[float, dict[str, RoutingStats]]:
    """One optimiser step (grad_accum micro-steps): forward, backward, step; returns this rank's
    mean loss and its routing stats (micro-steps summed). Data wait is timed here."""
    torch.manual_seed(step_seed(run.cfg.optim.seed, run.result.step + 1, run.rank))
    engine, loss_sum, stats = run.engine, 0.0, {}
    placement = placement_of(engine)  # device, dtype (bf16) and memory format of the inputs
    for _ in range(run.cfg.optim.grad_accum):
        t0 = time.perf_counter()
        batch = run.batches.next()
        run.data_waits.append(time.perf_counter() - t0)
        out = engine(placement.images(batch.images), placement.move(batch.labels))
        engine.backward(out.loss)
        engine.step()
        loss_sum += float(out.loss.detach())
        stats = accumulate_stats(stats, collect_routing_stats(engine.module))
        if run.keys_file is not None:
            run.keys_file.write(json.dumps({"step": run.result.step + 1, "epoch": run.batches.epoch,
                                            "world": run.world, "pid": os.getpid(), "time": time.time(),
                                            "keys": list(batch.keys)}) + "\n")
            run.keys_file.flush()
    if run.ema is not None:  # after the optimiser step (the last micro-step's engine.step())
        run.ema.update(run.result.step + 1)
    return loss_sum / run.cfg.optim.grad_accum, stats


def _due(step: int, every: int | None, last: int) -> bool:
    return bool(every) and step % every == 0 or step == last


def maybe_log(run: _Run, force: bool) -> None:
    """Every metrics.log_every steps (and before an eval or a checkpoint): one all-reduce of the
    interval's losses and routing stats, then a StepRecord to the sinks."""
    cfg, step = run.cfg, run.result.step
    if not (force or _due(step, cfg.metrics.log_every, cfg.optim.steps)):
        return
    per_step = run.tracker.flush()
    for s, loss, _ in per_step:
        check_finite(s, loss)
        run.result.losses[s] = loss
    now = time.perf_counter()
    steps = step - run.reported_step
    samples = steps * cfg.data.batch_size
    bad = dict(getattr(run.batches.loader, "bad_samples", None) or {})
    record = StepRecord(
        step=step, steps=steps, samples=samples, loss=per_step[-1][1],
        lr=float(run.engine.optimizer.param_groups[0]["lr"]), epoch=run.batches.epoch,
        samples_per_s=samples / max(now - run.t_report, 1e-9), first_step_time=run.first_step_time,
        routing=_sum_steps(per_step), routing_steps=[(s, st) for s, _, st in per_step],
        step_seconds=run.step_seconds, data_wait_seconds=run.data_waits,
        bad_samples={k: v - run.bad_sent.get(k, 0) for k, v in bad.items() if v > run.bad_sent.get(k, 0)},
        rank=run.rank)
    run.reported_step, run.step_seconds, run.data_waits, run.bad_sent = step, [], [], bad
    run.t_report = now  # the next interval's throughput starts here
    if run.rank == 0:
        log.info("step %d: loss %.4f lr %.2e %.1f samples/s", step, record.loss, record.lr,
                 record.samples_per_s)
    run.emit(record)


def _sum_steps(per_step: list) -> dict[str, RoutingStats]:
    total: dict[str, RoutingStats] = {}
    for _, _, st in per_step:
        total = accumulate_stats(total, st)
    return total


def maybe_eval(run: _Run, force: bool = False) -> None:
    """Every metrics.eval_every steps and at the end: evaluate, emit an EvalRecord."""
    cfg, step = run.cfg, run.result.step
    if not (force or _due(step, cfg.metrics.eval_every, cfg.optim.steps)):
        return
    record = evaluate(run.engine, run.eval_loader, max_batches=cfg.metrics.eval_batches,
                      start_state=run.eval_start, step=step, ema=run.ema)
    run.result.eval = record.as_metrics()
    run.t_report = time.perf_counter()  # evaluation time is not training throughput
    if run.rank == 0:
        log.info("step %d: accuracy %.4f on %d images at %.3fM MAdds/sample (exit rate %.3f)", step,
                 record.accuracy, record.samples, record.macs_per_sample / 1e6, record.exit_rate)
    run.emit(record)


def maybe_save(run: _Run, force: bool = False) -> None:
    """Every checkpoint.every steps and at the end: write a checkpoint, emit a CheckpointRecord."""
    cfg, step = run.cfg, run.result.step
    if not (force or _due(step, cfg.checkpoint.every, cfg.optim.steps)):
        return
    t0 = time.perf_counter()
    meta = {"ep_size": cfg.model.ep_size, "samples": step * cfg.data.batch_size,
            "data": run.batches.state_dict(), "routing": run.tracker.state_dict(), "config": dump_job(cfg)}
    path = run.ckpts.save(run.engine, step, meta)
    run.result.checkpoint = path
    run.emit(CheckpointRecord(step, path if run.rank == 0 else None, time.perf_counter() - t0, run.rank))
    run.t_report = time.perf_counter()  # checkpoint time is not training throughput


def maybe_stop(run: _Run, stop: StopSource | None) -> bool:
    """After each step: do the ranks agree to stop (condmoe.trainer.stop: preemption, SIGTERM, Ctrl-C)?
    Then checkpoint this step (unless its periodic checkpoint was just written), emit a StopRecord and
    return True. One 1-element all-reduce per step, only for a job with a stop source."""
    cfg, step = run.cfg, run.result.step
    if stop is None or step >= cfg.optim.steps:  # the last step ends the run anyway
        return False
    code = agree(stop.poll())
    if not code:
        return False
    t0 = time.perf_counter()
    if not _due(step, cfg.checkpoint.every, cfg.optim.steps):
        if run.reported_step < step:  # the routing totals the checkpoint keeps: this step's too
            maybe_log(run, force=True)
        maybe_save(run, force=True)
    stop.done()
    run.result.stopped = REASONS[code]
    if run.rank == 0:
        log.warning("stopped after step %d (%s); checkpoint %s", step, REASONS[code], run.result.checkpoint)
    run.emit(StopRecord(step, REASONS[code], run.result.checkpoint if run.rank == 0 else None,
                        time.perf_counter() - t0, run.rank))
    return True


def train(cfg: JobConfig, *, sinks: Sequence[MetricsSink] | None = None, resume: str | Path | None = None,
          loader_factory: LoaderFactory = streaming_loader, stop: StopSource | None = None) -> TrainResult:
    """Train ``cfg`` to ``cfg.optim.steps`` optimiser steps; resumes from the newest checkpoint.

    resume: explicit checkpoint (or run / checkpoint-root dir); the run's own
        newest checkpoint wins when it exists (restart after a failure).
    sinks: where the records go (default: :func:`default_sinks`); closed at the end, also on error.
    stop: asked after every step (:func:`maybe_stop`); the result's ``stopped`` says why it ended early.
    An elastic job runs the config of its current world size (``JobConfig.for_world``).
    """
    rank, world = setup_distributed(cfg)
    cfg = cfg.for_world(world)  # elastic: this world's ep_size and grad_accum; a fixed size: cfg itself
    sinks = default_sinks(cfg, rank) if sinks is None else list(sinks)
    try:
        engine = build_engine(cfg, world)
        ema = build_ema(cfg, engine.module)
        ckpts = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                                  portable=cfg.checkpoint.portable, ema=ema)
        source, meta = _resume(cfg, engine, ckpts, resume, world)
        step = int(meta.get("step", 0))
        eval_loader = loader_factory(cfg, cfg.data.eval_split, cfg.data.eval_batch_size, rank, world, False)
        run = _Run(cfg, rank, world, engine,
                   _Batches(loader_factory(cfg, cfg.data.train_split, cfg.micro_batch(world), rank, world, True),
                            meta.get("data", {})),
                   eval_loader, eval_loader.state_dict(), ckpts, RoutingTracker.from_state(meta.get("routing")),
                   sinks, TrainResult(step=step, resumed_from=source), reported_step=step, ema=ema)
        run.emit(RestartRecord(step, world, source, rank))
        if cfg.metrics.record_keys:
            (cfg.run_dir / "keys").mkdir(parents=True, exist_ok=True)
            run.keys_file = open(cfg.run_dir / "keys" / f"rank{rank}.jsonl", "a")
        if source is not None and step >= cfg.optim.steps:
            _already_finished(run, source)
        engine.train()
        while run.result.step < cfg.optim.steps:
            t0 = time.perf_counter()
            loss, stats = train_step(run)
            run.result.step += 1
            run.tracker.record(run.result.step, stats, loss)
            run.step_seconds.append(time.perf_counter() - t0)
            run.first_step_time = run.first_step_time or time.time()
            check_finite(run.result.step, loss)  # this rank's loss; the all-rank mean is checked at each log
            eval_due = _due(run.result.step, cfg.metrics.eval_every, cfg.optim.steps)
            save_due = _due(run.result.step, cfg.checkpoint.every, cfg.optim.steps)
            maybe_log(run, force=eval_due or save_due)
            maybe_eval(run)
            maybe_save(run)
            if maybe_stop(run, stop):
                break
        run.result.routing = run.tracker.state_dict()
        if run.keys_file is not None:
            run.keys_file.close()
        return run.result
    finally:
        for sink in sinks:
            sink.close()


def _already_finished(run: _Run, source: Path) -> None:
    """A finished run started again: nothing to train; evaluate what it holds and hand it on."""
    log.warning("run %s is already at step %d of %d (raise optim.steps or pick a new cluster.name to "
                "train more)", run.cfg.run_name, run.result.step, run.cfg.optim.steps)
    maybe_eval(run, force=True)
    run.result.checkpoint = source  # a Path, or an s3:// URL string
    run.emit(CheckpointRecord(run.result.step, source if run.rank == 0 else None, 0.0, run.rank))
