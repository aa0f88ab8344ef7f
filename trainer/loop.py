"""The one train loop every method uses (torchtitan-shaped: build -> train_step -> eval).

It runs inside one worker: under Ray Train, under the plain ``deepspeed``
launcher, or in a single test process. It never imports Ray: metrics and
checkpoint hand-offs go through the ``report(metrics, checkpoint_path)``
callable (every rank calls it the same number of times; only rank 0 passes a
path).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from condmoe.routing import RoutingStats, accumulate_stats, collect_routing_stats
from condmoe.routing.macs import count_macs

from .checkpoint import CheckpointManager, resolve_checkpoint
from .config import JobConfig, dump_job
from .engine import build_engine, setup_distributed

log = logging.getLogger(__name__)

Report = Callable[[dict, "Path | None"], None]


class Loader(Protocol):
    """What the loop needs from a reader (condmoe.datasets.StreamingLoader fits)."""

    def __iter__(self) -> Iterator[Any]: ...  # batches with .images (B,C,H,W), .labels (B,), .keys
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LoaderFactory = Callable[..., Loader]


def streaming_loader(cfg: JobConfig, split: str, batch_size: int, rank: int, world_size: int,
                     train: bool) -> Loader:
    """The default reader: condmoe.datasets.StreamingLoader over the job's shards."""
    from condmoe.datasets import StreamingLoader

    return StreamingLoader(cfg.data.path, split, batch_size, rank=rank, world_size=world_size,
                           num_workers=cfg.data.num_workers, seed=cfg.data.seed,
                           augment=cfg.data.augment and train,
                           remainder="drop")


@dataclass
class TrainResult:
    """What a finished run returns (on every rank)."""

    step: int
    losses: dict[int, float] = field(default_factory=dict)   # step -> global mean loss
    eval: dict[str, float] = field(default_factory=dict)
    routing: dict[str, dict] = field(default_factory=dict)   # run totals, all ranks
    checkpoint: Path | None = None
    resumed_from: Path | None = None


def allreduce_stats(stats: dict[str, RoutingStats]) -> dict[str, RoutingStats]:
    """Sum per-layer RoutingStats over all ranks (layers missing on a rank count as zero)."""
    return allreduce_step_stats([stats])[0]


def allreduce_step_stats(steps: list[dict[str, RoutingStats]]) -> list[dict[str, RoutingStats]]:
    """Sum each step's per-layer RoutingStats over all ranks, every step in ONE all-reduce.

    A layer appears in a step's result when it ran on any rank in that step; where
    it did not run on a rank it counts as zero there.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [dict(s) for s in steps]
    local = [{n: (s.num_experts, s.kind) for n, s in step.items()} for step in steps]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    if any(len(part) != len(steps) for part in every):
        raise RuntimeError(f"ranks report routing stats for different step counts: {[len(p) for p in every]}")
    layouts: list[dict[str, tuple[int, str]]] = []
    for i in range(len(steps)):
        layout: dict[str, tuple[int, str]] = {}
        for part in every:
            layout.update(part[i])
        layouts.append(dict(sorted(layout.items())))
    chunks = [steps[i][n].to_tensor() if n in steps[i] else torch.zeros(e + 3, dtype=torch.float64)
              for i, layout in enumerate(layouts) for n, (e, _) in layout.items()]
    if not chunks:
        return [{} for _ in steps]
    flat = torch.cat(chunks)
    dist.all_reduce(flat)
    out, at = [], 0
    for layout in layouts:
        merged = {}
        for n, (e, kind) in layout.items():
            merged[n] = RoutingStats.from_tensor(flat[at:at + e + 3], kind=kind)
            at += e + 3
        out.append(merged)
    return out


def _allreduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, loader: Loader, *, max_batches: int | None = None, macs_batches: int = 2,
             start_state: dict | None = None) -> dict[str, float]:
    """Accuracy, multiply-adds per sample (early exits counted) and exit rate over ``loader``.

    Every rank runs the same number of batches (the loader guarantees equal
    lengths), so expert-parallel all-to-alls stay matched.
    """
    module = engine.module
    was_training = module.training
    module.eval()
    if start_state is not None:
        loader.load_state_dict(start_state)  # the same samples at every evaluation
    correct = total = exited = 0.0
    macs_sum = macs_n = 0.0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = batch.images, batch.labels
            out = engine(x)
            correct += (out.logits.argmax(-1) == y).sum().item()
            total += y.numel()
            if out.exited is not None:
                exited += out.exited.sum().item()
            if i < macs_batches:
                rep = count_macs(module, x)
                macs_sum += rep.per_sample * rep.batch_size
                macs_n += rep.batch_size
    finally:
        module.train(was_training)
        collect_routing_stats(module)  # eval routing is not training load
    correct, total, exited, macs_sum, macs_n = _allreduce_sum([correct, total, exited, macs_sum, macs_n])
    return {"eval_accuracy": correct / max(total, 1), "eval_samples": total,
            "eval_macs_per_sample": macs_sum / max(macs_n, 1), "eval_exit_rate": exited / max(total, 1)}


class _Batches:
    """Endless batches over epochs; tracks the epoch for the checkpoint's data position."""

    def __init__(self, loader: Loader, epoch: int) -> None:
        self.loader, self.epoch = loader, epoch
        self.loader.set_epoch(epoch)
        self._it: Iterator | None = None

    def next(self):
        empty = 0
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                empty += 1
                if empty > 2:
                    raise RuntimeError("the training loader yields no batches") from None
                # StreamingLoader moves itself to the next epoch at the end of one; others may not
                now = self.loader.state_dict().get("epoch", self.epoch)
                if now == self.epoch:
                    self.loader.set_epoch(self.epoch + 1)
                self.epoch = int(self.loader.state_dict().get("epoch", self.epoch + 1))
                self._it = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}


def _lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def train(cfg: JobConfig, *, report: Report | None = None, resume: str | Path | None = None,
          loader_factory: LoaderFactory = streaming_loader,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``cfg`` to ``cfg.optim.steps`` optimiser steps; resumes from the newest checkpoint.

    resume: explicit checkpoint (or run / checkpoint-root dir); the run's own
        newest checkpoint wins when it exists (restart after a failure).
    report: called with (metrics, checkpoint path or None) at every log,
        eval and checkpoint; never required.
    """
    rank, world = setup_distributed(cfg)
    engine = build_engine(cfg, world)
    micro = cfg.micro_batch(world)
    train_loader = loader_factory(cfg, cfg.data.train_split, micro, rank, world, True)
    eval_loader = loader_factory(cfg, cfg.data.eval_split, cfg.data.eval_batch_size, rank, world, False)
    eval_start = eval_loader.state_dict()
    ckpts = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                              portable=cfg.checkpoint.portable)
    result = TrainResult(step=0)

    source = ckpts.latest() or (resolve_checkpoint(resume) if resume else None)
    totals: dict[str, RoutingStats] = {}
    data_state: dict = {"epoch": 0}
    if source is not None:
        meta = ckpts.load(engine, source, world_size=world, ep_size=cfg.model.ep_size)
        result.step, result.resumed_from = int(meta["step"]), source
        data_state = meta.get("data", data_state)
        totals = {n: RoutingStats.from_dict(d) for n, d in meta.get("routing", {}).items()}
        log.info("resumed from %s at step %d", source, result.step)
    batches = _Batches(train_loader, int(data_state.get("epoch", 0)))
    if "loader" in data_state:
        train_loader.load_state_dict(data_state["loader"])

    keys_file = None
    if cfg.metrics.record_keys:
        (cfg.run_dir / "keys").mkdir(parents=True, exist_ok=True)
        keys_file = open(cfg.run_dir / "keys" / f"rank{rank}.jsonl", "a")

    metrics_file = cfg.run_dir / "metrics.jsonl"

    def _report(metrics: dict, path: Path | None = None) -> None:
        if rank == 0:  # the run's own history, also without Ray
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with open(metrics_file, "a") as f:
                line = {k: v for k, v in metrics.items() if k != "routing_steps"}  # per-step rows: Parquet log
                f.write(json.dumps({**line, "checkpoint": str(path) if path else None}) + "\n")
        if report is not None:
            report(metrics, path if rank == 0 else None)

    def _save(step: int) -> Path:
        meta = {"ep_size": cfg.model.ep_size, "samples": step * cfg.data.batch_size,
                "data": batches.state_dict(),
                "routing": {n: s.as_dict() for n, s in allreduce_stats(interval_totals()).items()},
                "config": dump_job(cfg)}
        return ckpts.save(engine, step, meta)

    interval_steps: list[tuple[int, dict[str, RoutingStats]]] = []  # (step, this rank's stats) since the last report

    def interval_totals() -> dict[str, RoutingStats]:
        # run totals on this rank = restored global totals (rank 0 only) + this attempt's
        base = totals if rank == 0 else {}
        return accumulate_stats(base, run_local)

    run_local: dict[str, RoutingStats] = {}
    t_last, samples_last = time.perf_counter(), 0
    first_step_time: float | None = None
    engine.train()
    if source is not None and result.step >= cfg.optim.steps:
        # a finished run started again: nothing to train, evaluate what it holds
        log.warning("run %s is already at step %d of %d (raise optim.steps or pick a new "
                    "cluster.name to train more)", cfg.run_name, result.step, cfg.optim.steps)
        metrics = {"step": result.step, "loss": float("nan"), "checkpoint_step": result.step,
                   **evaluate(engine, eval_loader, max_batches=cfg.metrics.eval_batches,
                              start_state=eval_start)}
        result.eval = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        result.checkpoint = Path(source)
        _report(metrics, Path(source))
    while result.step < cfg.optim.steps:
        loss_sum = 0.0
        this_step: dict[str, RoutingStats] = {}
        for _ in range(cfg.optim.grad_accum):
            batch = batches.next()
            out = engine(batch.images, batch.labels)
            engine.backward(out.loss)
            engine.step()
            loss_sum += float(out.loss.detach())
            stats = collect_routing_stats(engine.module)
            this_step = accumulate_stats(this_step, stats)
            run_local = accumulate_stats(run_local, stats)
            if keys_file is not None:
                keys_file.write(json.dumps({"step": result.step + 1, "epoch": batches.epoch,
                                            "world": world, "pid": os.getpid(),
                                            "keys": list(batch.keys)}) + "\n")
                keys_file.flush()
        result.step += 1
        step = result.step
        interval_steps.append((step, this_step))
        loss = _allreduce_sum([loss_sum / cfg.optim.grad_accum])[0] / world
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        result.losses[step] = loss
        if first_step_time is None:
            first_step_time = time.time()
        samples_last += micro * cfg.optim.grad_accum * world
        if on_step is not None:
            on_step(step)
        do_log = step % cfg.metrics.log_every == 0 or step == cfg.optim.steps
        do_eval = (cfg.metrics.eval_every and step % cfg.metrics.eval_every == 0) or step == cfg.optim.steps
        do_ckpt = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.optim.steps
        if not (do_log or do_eval or do_ckpt):
            continue
        now = time.perf_counter()
        metrics: dict[str, Any] = {"step": step, "loss": loss, "lr": _lr(engine), "epoch": batches.epoch,
                                   "samples_per_s": samples_last / max(now - t_last, 1e-9),
                                   "time": time.time(), "first_step_time": first_step_time}
        t_last, samples_last = now, 0
        # every step's stats summed over ranks, in one collective per report
        per_step = allreduce_step_stats([st for _, st in interval_steps])
        routing: dict[str, RoutingStats] = {}
        for st in per_step:
            routing = accumulate_stats(routing, st)
        metrics["routing"] = {n: s.as_dict() for n, s in routing.items()}
        metrics["routing_steps"] = [{"step": k, "routing": {n: s.as_dict() for n, s in st.items()}}
                                    for (k, _), st in zip(interval_steps, per_step)]
        interval_steps = []
        if do_eval:
            metrics.update(evaluate(engine, eval_loader, max_batches=cfg.metrics.eval_batches,
                                    start_state=eval_start))
            result.eval = {k: v for k, v in metrics.items() if k.startswith("eval_")}
            if rank == 0:
                log.info("step %d: loss %.4f, accuracy %.4f at %.3fM MAdds/sample (exit rate %.3f)",
                         step, loss, metrics["eval_accuracy"], metrics["eval_macs_per_sample"] / 1e6,
                         metrics["eval_exit_rate"])
        elif rank == 0:
            log.info("step %d: loss %.4f lr %.2e %.1f samples/s", step, loss, metrics["lr"],
                     metrics["samples_per_s"])
        path = _save(step) if do_ckpt else None
        if path is not None:
            result.checkpoint = path
            metrics["checkpoint_step"] = step  # on every rank (only rank 0 gets the path)
        _report(metrics, path)
    result.routing = {n: s.as_dict() for n, s in allreduce_stats(interval_totals()).items()}
    if keys_file is not None:
        keys_file.close()
    return result
