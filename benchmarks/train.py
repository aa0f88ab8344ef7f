"""condmoe's Ray + DeepSpeed job against a plain single-process PyTorch loop (CPU).

Same model, same shards (StreamingLoader), same batch size and the same torch
thread count per process, measured in one run:

- samples/s of the plain loop (AdamW, no DeepSpeed, no Ray; a process of its
  own, started as a user would) and of ``condmoe train`` with 1 worker
  (target >= 0.95x) and with 2 workers (target >= 1.25x), interleaved over
  rounds (medians); 2 workers also with ZeRO stage 0 (plain gradient
  all-reduce) beside the job's stage, to show what ZeRO's partitioning costs;
  condmoe's rate is the median of its log intervals after the first
  (warm-up) one, the plain loop's over the same number of steps after warm-up;
- the plain loop again with condmoe's worker environment (its malloc settings),
  so the ratio is also given with the allocator out of the picture;
- ``condmoe train`` with 1 worker keeping ZeRO stage ``--zero``
  (``deepspeed.zero_on_one_worker``; by default one worker runs stage 0);
- time from command start to the first finished step (``condmoe train`` as a
  subprocess, DeepSpeed's op cache warm);
- checkpoint save / load seconds per MB (sharded DeepSpeed files + portable state).

Prints a table and writes benchmarks/results/train.json.

    python benchmarks/train.py [--model condconv_cnn --size small --experts 8 --steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from condmoe.trainer.records import read_jsonl

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def _shards(path: Path, limit: int) -> Path:
    from condmoe.datasets import write_shards

    if (path / "manifest.parquet").is_file():
        return path
    return write_shards("fashion_mnist", path, samples_per_shard=1000, limit=limit)


def _job(args, shards: Path, storage: Path, workers: int, name: str, keep_zero: bool = False,
         zero: int | None = None) -> Path:
    tree = {"model": {"name": args.model, "size": args.size, "experts": args.experts},
            "data": {"path": str(shards), "batch_size": args.batch * workers, "eval_batch_size": 256},
            "optim": {"optimizer": "adamw", "lr": 1e-3, "steps": args.steps, "schedule": "constant"},
            "deepspeed": {"zero_stage": args.zero if zero is None else zero, "zero_on_one_worker": keep_zero},
            "checkpoint": {"every": 0, "keep_last": 1},
            "metrics": {"log_every": args.log_every, "eval_every": 0, "eval_batches": 1},
            "cluster": {"workers": workers, "threads_per_worker": args.threads, "storage_path": str(storage),
                        "name": name, "max_failures": 0}}
    if args.model in ("coe_cnn", "topk_moe_cnn"):
        tree["model"]["ep_size"] = 1
    p = storage / f"{name}.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def plain_loop(args, shards: Path) -> float:
    """samples/s of a bare PyTorch loop: model from the registry, AdamW, StreamingLoader."""
    from condmoe.datasets import StreamingLoader
    from condmoe.routing import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    opts = {"experts": args.experts, "num_classes": 10, "in_channels": 1}
    model = build_model(args.model, args.size, **opts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = StreamingLoader(shards, "train", args.batch, seed=0)
    model.train()
    it = iter(loader)
    t0 = None
    warm = args.log_every
    for step in range(args.steps):
        if step == warm:
            t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        out = model(b.images, b.labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return (args.steps - warm) * args.batch / (time.perf_counter() - t0)


def plain_process(args, shards: Path, env: dict[str, str]) -> float:
    """plain_loop in a fresh process (the benchmark's own state never leaks in), with ``env`` added."""
    cmd = [sys.executable, __file__, "--plain-only", "--shards", str(shards), "--model", args.model,
           "--size", args.size, "--experts", str(args.experts), "--batch", str(args.batch),
           "--steps", str(args.steps), "--log-every", str(args.log_every), "--threads", str(args.threads)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads), **env},
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"plain loop failed:\n{p.stderr[-3000:]}")
    return float(json.loads(p.stdout.strip().splitlines()[-1])["samples_per_s"])


def condmoe_job(args, job: Path, storage: Path, name: str) -> dict:
    """Run ``condmoe train`` as a command; samples/s and seconds from start to the first step."""
    start = time.time()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run([str(Path(sys.executable).parent / "condmoe"), "train", str(job), "--json"],
                       env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"condmoe train failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    recs = read_jsonl(storage / name / "metrics.jsonl", "step")
    rates = [r["samples_per_s"] for r in recs[1:]]
    return {"samples_per_s": statistics.median(rates) if rates else float("nan"),
            "first_step_s": recs[0]["first_step_time"] - start, "total_s": time.time() - start}


def checkpoint_io(args, shards: Path, storage: Path) -> dict:
    """Seconds per MB to save and to load one checkpoint (world of one, ZeRO ``--zero`` kept:
    DeepSpeed's sharded files + the portable state)."""
    from condmoe.datasets import StreamingLoader
    from condmoe.trainer.checkpoint import CheckpointManager
    from condmoe.trainer.config import load_job
    from condmoe.trainer.engine import build_engine, setup_distributed

    cfg = load_job(_job(args, shards, storage, 1, "ckpt", keep_zero=True))
    setup_distributed(cfg)
    engine = build_engine(cfg, 1)
    b = next(iter(StreamingLoader(shards, "train", args.batch)))
    out = engine(b.images, b.labels)
    engine.backward(out.loss)
    engine.step()
    mgr = CheckpointManager(storage / "ckpt-io", keep_last=2)
    saves, loads = [], []
    for i in range(3):
        t = time.perf_counter()
        path = mgr.save(engine, i + 1, {"ep_size": 1})
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        mgr.load(engine, path, world_size=1, ep_size=1)
        loads.append(time.perf_counter() - t)
    mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    return {"checkpoint_mb": mb, "save_s_per_mb": statistics.median(saves) / mb,
            "load_s_per_mb": statistics.median(loads) / mb, "save_s": statistics.median(saves),
            "load_s": statistics.median(loads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="condconv_cnn")
    ap.add_argument("--size", default="small")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="per-worker batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved 1-worker variants")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--shards", type=Path, default=None, help="shard dir (default: written to a temp dir)")
    ap.add_argument("--limit", type=int, default=8000, help="Fashion-MNIST samples per split to shard")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    ap.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.plain_only:
        print(json.dumps({"samples_per_s": plain_loop(args, args.shards)}))
        return
    from condmoe.trainer.config import WORKER_MALLOC_ENV

    with tempfile.TemporaryDirectory(prefix="condmoe-bench-") as tmp:
        storage = Path(tmp)
        shards = _shards(args.shards or storage / "shards", args.limit)
        # every variant once per round, interleaved (machine load drifts on a shared host);
        # ratios are of the medians
        runs: dict[str, list] = {"plain": [], "plain_worker_env": [], "one": [], "one_keep_zero": [], "two": [],
                                 "two_zero0": []}
        for r in range(args.rounds):
            runs["plain"].append(plain_process(args, shards, {}))
            runs["one"].append(condmoe_job(args, _job(args, shards, storage, 1, f"w1-{r}"), storage, f"w1-{r}"))
            runs["plain_worker_env"].append(plain_process(args, shards, WORKER_MALLOC_ENV))
            runs["one_keep_zero"].append(condmoe_job(
                args, _job(args, shards, storage, 1, f"w1z-{r}", keep_zero=True), storage, f"w1z-{r}"))
            runs["two"].append(condmoe_job(args, _job(args, shards, storage, 2, f"w2-{r}"), storage, f"w2-{r}"))
            runs["two_zero0"].append(condmoe_job(
                args, _job(args, shards, storage, 2, f"w2z0-{r}", zero=0), storage, f"w2z0-{r}"))
            print(f"round {r + 1}/{args.rounds}: plain {runs['plain'][-1]:.1f}, 1 worker "
                  f"{runs['one'][-1]['samples_per_s']:.1f}, plain (worker env) "
                  f"{runs['plain_worker_env'][-1]:.1f}, 1 worker ZeRO {args.zero} "
                  f"{runs['one_keep_zero'][-1]['samples_per_s']:.1f}, 2 workers "
                  f"{runs['two'][-1]['samples_per_s']:.1f}, 2 workers ZeRO 0 "
                  f"{runs['two_zero0'][-1]['samples_per_s']:.1f} samples/s", flush=True)
        plain = statistics.median(runs["plain"])
        plain_env = statistics.median(runs["plain_worker_env"])
        one, keep, two, two0 = ({k: statistics.median(run[k] for run in runs[name]) for k in runs[name][0]}
                                for name in ("one", "one_keep_zero", "two", "two_zero0"))
        ckpt = checkpoint_io(args, shards, storage)

    rows = [("plain PyTorch loop, 1 process", plain, None),
            ("plain loop, condmoe worker env", plain_env, None),
            ("condmoe train, 1 worker", one["samples_per_s"], one["first_step_s"]),
            (f"condmoe train, 1 worker ZeRO {args.zero}", keep["samples_per_s"], keep["first_step_s"]),
            (f"condmoe train, 2 workers ZeRO {args.zero}", two["samples_per_s"], two["first_step_s"]),
            ("condmoe train, 2 workers ZeRO 0", two0["samples_per_s"], two0["first_step_s"])]
    print(f"\n{args.model}/{args.size} E={args.experts}, batch {args.batch}/worker, {args.threads} thread(s)"
          f"/process, ZeRO {args.zero} (1 worker: stage 0 unless kept), {args.steps} steps, "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs")
    print(f"{'variant':<36} {'samples/s':>10} {'vs plain':>9} {'vs plain env':>13} {'start->1st step':>16}")
    for name, rate, first in rows:
        f = f"{first:.1f}s" if first is not None else "-"
        print(f"{name:<36} {rate:>10.1f} {rate / plain:>8.2f}x {rate / plain_env:>12.2f}x {f:>16}")
    paired = {name: [r["samples_per_s"] / p for r, p in zip(runs[name], runs["plain"])]
              for name in ("one", "one_keep_zero", "two", "two_zero0")}
    for name, label in (("one", "1 worker"), ("one_keep_zero", f"1 worker ZeRO {args.zero}"),
                        ("two", f"2 workers ZeRO {args.zero}"), ("two_zero0", "2 workers ZeRO 0")):
        v = paired[name]
        print(f"{label} / plain, paired by round: median {statistics.median(v):.2f}x "
              f"(min {min(v):.2f}, max {max(v):.2f}, {len(v)} rounds)")
    print(f"checkpoint: {ckpt['checkpoint_mb']:.2f} MB, save {ckpt['save_s']:.3f}s "
          f"({ckpt['save_s_per_mb']:.3f} s/MB), load {ckpt['load_s']:.3f}s ({ckpt['load_s_per_mb']:.3f} s/MB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
        "worker_env": WORKER_MALLOC_ENV, "runs": runs,
        "plain_samples_per_s": plain, "plain_worker_env_samples_per_s": plain_env,
        "one_worker": one, "one_worker_keep_zero": keep, "two_workers": two, "two_workers_zero0": two0,
        "ratio_one_worker": one["samples_per_s"] / plain,
        "ratio_one_worker_same_env": one["samples_per_s"] / plain_env,
        "ratio_one_worker_keep_zero": keep["samples_per_s"] / plain,
        "ratio_two_workers": two["samples_per_s"] / plain,
        "ratio_two_workers_zero0": two0["samples_per_s"] / plain, "paired_round_ratios": paired,
        "checkpoint": ckpt}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
