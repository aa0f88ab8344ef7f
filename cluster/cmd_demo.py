"""``condmoe demo``: the main job, small: shard Fashion-MNIST, train CondConv on Ray, show the result.

1. writes Fashion-MNIST as WebDataset shards under ``data/fashion_mnist`` (once);
2. trains ``configs/condconv.yaml`` (condconv_cnn/small, 8 experts) with 2 workers
   on an embedded local Ray, DeepSpeed ZeRO on gloo, for a few hundred steps;
3. prints test accuracy beside multiply-adds per sample, where the checkpoint is,
   the job's Prometheus exporter URL, and ends with the expert-use table of the run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rich.console import Console

from condmoe.datasets import MANIFEST_NAME, write_shards
from condmoe.routing import RoutingStats

from .cli import SHIPPED_PREFIX, resolve_job, training_failed, worker_log_overrides
from .cmd_shards import DEFAULT_SAMPLES_PER_SHARD
from .expert_view import expert_table

log = logging.getLogger(__name__)

DEFAULT_JOB = f"{SHIPPED_PREFIX}condconv"  # configs/condconv.yaml, installed with the package


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="shard Fashion-MNIST, train CondConv with 2 Ray workers, show accuracy and expert use")
    p.add_argument("--job", default=DEFAULT_JOB,
                   help=f"job file, or condmoe:NAME for a shipped job (default {DEFAULT_JOB}, configs/condconv.yaml)")
    p.add_argument("--data", default="data/fashion_mnist", help="shard folder (written when missing)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--storage", default="runs", help="Ray Train storage path (default runs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra job overrides, e.g. --set model.size=tiny")
    p.set_defaults(func=run)


def _ensure_shards(console: Console, data: Path) -> None:
    if (data / MANIFEST_NAME).is_file():
        console.print(f"shards: {data} (already written)")
        return
    console.print(f"shards: writing Fashion-MNIST to {data} ...")
    start = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 5 or done == total:
            last[0] = now
            console.print(f"  {done}/{total} samples")

    write_shards("fashion_mnist", data, samples_per_shard=DEFAULT_SAMPLES_PER_SHARD, progress=progress)
    console.print(f"shards: done in {time.perf_counter() - start:.0f}s")


def run(args: argparse.Namespace) -> int:
    from condmoe.trainer.checkpoint import read_meta

    from .launch import load_and_launch

    job = resolve_job(args.job)  # before anything is written or started
    console = Console(width=None if Console().is_terminal else 130)
    data = Path(args.data)
    _ensure_shards(console, data)
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [
        f"data.path={data}",
        f"optim.steps={args.steps}",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        f"checkpoint.every={args.steps}",
        f"metrics.eval_every={args.steps}",
        f"cluster.workers={args.workers}",
        f"cluster.storage_path={Path(args.storage).resolve()}",
        f"cluster.name={run_name}",
        *args.overrides,
        *worker_log_overrides(args),
    ]
    console.print(f"[bold]condmoe demo[/]: {args.job} with {args.workers} workers on embedded Ray, "
                  f"{args.steps} steps (torch threads per worker from the job file)")
    start = time.perf_counter()
    try:
        res = load_and_launch(job, overrides)
    except RuntimeError as exc:  # ray.train's TrainingFailedError and friends
        return training_failed("demo", exc)
    if res.error:
        return training_failed("demo", res.error)
    m = res.metrics
    console.print(f"\ntrained {m.get('step')} steps in {time.perf_counter() - start:.0f}s, final loss {m.get('loss', float('nan')):.4f}")
    console.print(f"test accuracy:  {100 * m['eval_accuracy']:.2f}% on {int(m['eval_samples'])} test images")
    console.print(f"multiply-adds:  {m['eval_macs_per_sample'] / 1e6:.3f}M per sample "
                  f"(routing FCs and kernel mixing included)")
    meta = read_meta(res.checkpoint)
    totals = {name: RoutingStats.from_dict(d) for name, d in meta.get("routing", {}).items()}
    console.print(f"checkpoint:     {res.checkpoint}")
    console.print(f"run directory:  {res.run_dir}  (resume: condmoe train {args.job} --resume {res.run_dir})")
    console.print(f"Prometheus:     {res.exporter_url or 'exporter off'} (served while the job ran; "
                  f"plots: condmoe report {res.run_dir})")
    console.print(expert_table(totals, title="expert use over the run (summed routing weights, all workers)"))
    return 0
