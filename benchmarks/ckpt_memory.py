"""Peak resident memory per rank while the portable state is saved and re-sharded on load.

Before: ``portable.pt``, the whole fp32 model and Adam state consolidated on rank
0 (``ds_checkpoint.consolidate``: fragments gathered, experts all-gathered as
pickled objects, one ``torch.save``). After: the sharded portable state
(trainer/sharded_state.py), each rank writing and reading only its slices.

The model is a top-k MoE built on ``deepspeed.moe.layer.MoE`` with wide Linear
experts (defaults: hidden 1024, expert FFN 4096, 10 experts, top-2; ~86M
parameters, ~1.03 GB of fp32 weights + Adam state), trained on CPU/gloo with
condmoe's topology rules: 1 worker runs ZeRO 0 with ep 1, 2 workers ZeRO 2 with
ep 2 (five experts per rank). Each measurement is its own set of processes:

- save at W workers (after one optimiser step): the portable state only;
  DeepSpeed's own ds/ files are the same before and after and not measured;
- re-sharding load at W workers of the state saved at the other worker count
  (2 -> 1: ep 2 -> 1, ZeRO 2 -> 0; 1 -> 2: ep 1 -> 2, ZeRO 0 -> 2), into an
  engine that has taken one step (so its Adam state and gradients exist).

Per rank: the RSS high-water mark (VmHWM) is reset (``/proc/self/clear_refs``
5) after ``malloc_trim`` right before the phase, and read after it;
``extra`` = peak - RSS at the start. ``share`` is the rank's part of the
portable state (fp32 weights + optimiser state of its partition).

Prints a table and writes benchmarks/results/ckpt_memory.json.

    python benchmarks/ckpt_memory.py [--hidden 1024 --ffn 4096 --experts 10]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> int:
    """Return freed heap to the OS, reset VmHWM to the current RSS; returns that RSS (bytes)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status()["VmRSS"]


# ---------------------------------------------------------------- one worker process
def _model(args, ep_size: int) -> torch.nn.Module:
    from deepspeed.moe.layer import MoE
    from torch import nn

    class WideMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(args.hidden, args.hidden)
            expert = nn.Sequential(nn.Linear(args.hidden, args.ffn), nn.ReLU(), nn.Linear(args.ffn, args.hidden))
            self.moe = MoE(hidden_size=args.hidden, expert=expert, num_experts=args.experts, ep_size=ep_size,
                           k=2, capacity_factor=2.0, min_capacity=4)
            self.out = nn.Linear(args.hidden, args.hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, hidden) -> scalar loss
            h = torch.relu(self.inp(x))
            y, aux, _ = self.moe(h)
            return self.out(h + y).pow(2).mean() + 0.01 * aux

    torch.manual_seed(0)
    return WideMoE()


def _engine(args, world: int):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    stage = 0 if world == 1 else 2  # condmoe's rule: one worker has nothing to shard
    model = _model(args, ep_size=world)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"})
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-4),
                                           config=config)
    if world == 1:
        engine.enable_backward_allreduce = False  # as condmoe's engine does on one worker
    g = torch.Generator().manual_seed(dist_rank())
    loss = engine(torch.randn(2, 16, args.hidden, generator=g))
    engine.backward(loss)
    engine.step()
    return engine, stage


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _share(engine) -> int:
    """Bytes of this rank's part of the portable state (its partition's fp32 weights + optimiser state)."""
    from condmoe.trainer.ds_checkpoint import OPTIM_KEYS, _base_state
    from condmoe.trainer.sharded_state import owned_slices

    keys = [k for k in OPTIM_KEYS if any(k in s for s in _base_state(engine).values())]
    slices, _ = owned_slices(engine, keys, reading=True)
    return sum(s.tensor.numel() * s.tensor.element_size() for k, s in slices.items() if not k.startswith("buffer/"))


def worker(args) -> None:
    import deepspeed
    import torch.distributed as dist

    from condmoe.trainer.ds_checkpoint import PORTABLE, consolidate, load_state, storable
    from condmoe.trainer.sharded_state import SHARDED_DIR, save_sharded

    from condmoe.trainer.ds_ops import load_ops

    torch.set_num_threads(1)
    load_ops()  # the op built by the pinned ninja, under condmoe's lock (trainer/ds_ops.py)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    engine, stage = _engine(args, world)
    ckpt = Path(args.ckpt)
    share = _share(engine)
    dist.barrier()
    start = _reset_peak()
    t0 = time.perf_counter()
    if args.phase == "save":
        if rank == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if args.format == "file":
            state = consolidate(engine)
            if state is not None:
                torch.save(storable(state), ckpt / PORTABLE)
            del state
        else:
            save_sharded(engine, ckpt / SHARDED_DIR)
        if rank == 0:
            meta = {"step": 1, "world_size": world, "ep_size": world, "zero_stage": stage, "portable": True,
                    "portable_format": args.format}
            (ckpt / "meta.json").write_text(json.dumps(meta))
    else:
        meta = json.loads((ckpt / "meta.json").read_text())
        load_state(engine, ckpt, meta, world_size=world, ep_size=world)
    seconds = time.perf_counter() - t0
    peak = _status()["VmHWM"]
    dist.barrier()
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "zero_stage": stage, "start_rss": start, "peak_rss": peak,
         "extra": peak - start, "share": share, "seconds": seconds}))


# ---------------------------------------------------------------- the driver
def _launch(args, world: int, phase: str, fmt: str, ckpt: Path, out: Path) -> list[dict]:
    from condmoe.trainer.engine import free_port

    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", "--phase", phase, "--format", fmt, "--ckpt", str(ckpt),
               "--out", str(out), "--hidden", str(args.hidden), "--ffn", str(args.ffn),
               "--experts", str(args.experts)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate()[0] for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise SystemExit(f"{phase} ({fmt}, {world} workers) failed:\n{log[-3000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ckpt_memory.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=["save", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--format", choices=["file", "sharded"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    params = sum(p.numel() for p in _model(args, ep_size=1).parameters())
    state_bytes = params * 4 * 3  # fp32 weights + Adam's two moments
    tmp = Path(tempfile.mkdtemp(prefix="ckpt_memory_"))
    rows = []
    try:
        for fmt in ("file", "sharded"):
            for world in (2, 1):
                for rec in _launch(args, world, "save", fmt, tmp / f"{fmt}-{world}", tmp / f"save-{fmt}-{world}"):
                    rows.append({"format": fmt, "phase": "save", "from_workers": world, **rec})
            for world in (1, 2):  # re-shard the state the other worker count saved
                src = tmp / f"{fmt}-{3 - world}"
                for rec in _launch(args, world, "load", fmt, src, tmp / f"load-{fmt}-{world}"):
                    rows.append({"format": fmt, "phase": "load", "from_workers": 3 - world, **rec})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"model: {params / 1e6:.1f}M params, portable state {state_bytes / MB:.0f} MB "
          f"(fp32 weights + Adam), hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, top-2")
    print(f"{'format':<8} {'phase':<5} {'workers':>8} {'rank':>4} {'share MB':>9} {'RSS MB':>8} "
          f"{'peak MB':>8} {'extra MB':>9} {'extra/state':>11} {'s':>6}")
    for r in rows:
        workers = f"{r['from_workers']}->{r['world']}" if r["phase"] == "load" else str(r["world"])
        print(f"{'before' if r['format'] == 'file' else 'after':<8} {r['phase']:<5} {workers:>8} {r['rank']:>4} "
              f"{r['share'] / MB:>9.0f} {r['start_rss'] / MB:>8.0f} {r['peak_rss'] / MB:>8.0f} "
              f"{r['extra'] / MB:>9.0f} {r['extra'] / state_bytes:>11.2f} {r['seconds']:>6.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"params": params, "state_bytes": state_bytes, "hidden": args.hidden,
                               "ffn": args.ffn, "experts": args.experts, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
