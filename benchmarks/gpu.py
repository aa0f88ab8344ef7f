"""GPU benchmark: CondConv network and layer throughput on one GPU, the top-k MoE all-to-all on two.

Three parts, timed with CUDA events after warm-up (median of interleaved rounds, so clock and
noise changes hit every variant alike):

- network: images/s and achieved TFLOP/s of condconv_cnn against its static baseline of the
  same shape (experts=1: plain convolutions, no routers), in bfloat16 (the parameters cast as
  DeepSpeed's bf16 mode casts them, bf16 images), NCHW and channels-last. FLOPs come from
  count_macs's multiply-adds per image (CondConv's kernel mixing and the routers included):
  2 FLOP per multiply-add, x3 for forward + backward. The full run adds condconv_efficientnet b0
  at 224x224. This is the model's compute (forward, loss, backward), not DeepSpeed's optimiser step.
- layer: CondConv2d forward and forward+backward (gradients to input, kernels and routing
  weights) against a static nn.Conv2d of the same shape, at E = 4, 8, 16, in bf16. Target:
  <= 1.1x static at E = 8 for the 3x3 convolutions.
- alltoall: the share of a top-k MoE training step (topk_moe_cnn, ep_size 2, bf16, DeepSpeed
  engine built by condmoe's trainer) spent in the experts' all-to-all, from torch.profiler's
  NCCL kernel times (a kernel's time includes waiting for the peer), on 2 GPUs where present
  (skipped otherwise).

    python benchmarks/gpu.py [--quick] [--parts network layer alltoall] [--out PATH]

Prints a table per part and writes JSON to benchmarks/results/gpu.json. ``--quick`` (fewer shapes
and rounds) is meant to finish in well under 3 minutes on an H100/H200. Without a CUDA GPU it
prints one line and exits with status 2, measuring nothing (``--allow-cpu`` runs the same code on
the CPU to check the script; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "gpu.json"
TARGET_E8_3X3 = 1.1

# name: (in, out, kernel, groups, spatial); batch from --layer-batch
LAYER_SHAPES = {
    "3x3 64->64 @56x56": (64, 64, 3, 1, 56),
    "3x3 128->128 @28x28": (128, 128, 3, 1, 28),
    "3x3 256->256 @14x14": (256, 256, 3, 1, 14),
    "1x1 256->256 @14x14": (256, 256, 1, 1, 14),
    "dw3x3 256 @28x28": (256, 256, 3, 256, 28),
}
QUICK_LAYER_SHAPES = ("3x3 128->128 @28x28", "3x3 256->256 @14x14", "1x1 256->256 @14x14", "dw3x3 256 @28x28")

# (family, size, image side, channels, classes, batch)
NETWORKS = [("condconv_cnn", "small", 28, 1, 10, 1024), ("condconv_efficientnet", "b0", 224, 3, 1000, 128)]


# ---------------------------------------------------------------- timing
class Clock:
    """Seconds per call of ``fn`` over ``iters`` calls: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def per_call(self, fn, iters: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def measure(variants: dict, clock: Clock, *, warmup: int, iters: int, rounds: int) -> dict[str, float]:
    """{variant: median seconds per call}; the variants run interleaved, round by round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    if clock.cuda:
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            samples[key].append(clock.per_call(fn, iters))
    return {k: statistics.median(v) for k, v in samples.items()}


def _fwd(f):
    def run():
        with torch.no_grad():
            f()
    return run


def _fwd_bwd(f, tensors):
    def run():
        y = f()
        y.backward(torch.ones_like(y))
        for t in tensors:
            t.grad = None
    return run


# ---------------------------------------------------------------- network
def bench_network(family: str, size: str, side: int, channels: int, classes: int, batch: int, device, dtype,
                  clock: Clock, quick: bool) -> list[dict]:
    from condmoe.routing import build_model
    from condmoe.routing.macs import count_macs

    rows = []
    for memory_format in ("nchw", "channels_last"):
        fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        models, inputs, macs = {}, {}, {}
        for experts in (8, 1):
            torch.manual_seed(0)
            model = build_model(family, size, experts=experts, num_classes=classes, in_channels=channels)
            model = model.to(device, dtype)
            x = torch.randn(batch, channels, side, side, device=device, dtype=dtype).to(memory_format=fmt)
            y = torch.randint(0, classes, (batch,), device=device)
            macs[experts] = count_macs(model, x[:16]).per_sample
            models[experts], inputs[experts] = model, (x, y)

        def forward(m, x):
            return lambda: m(x).logits

        def train(m, x, y):
            params = [p for p in m.parameters() if p.requires_grad]

            def run():
                m(x, y).loss.backward()
                for p in params:
                    p.grad = None
            return run

        variants = {}
        for e, m in models.items():
            x, y = inputs[e]
            variants[f"fwd_{e}"] = _fwd(forward(m.eval(), x))
        times_fwd = measure(variants, clock, warmup=3, iters=5 if quick else 10, rounds=3 if quick else 5)
        variants = {f"fb_{e}": train(m.train(), *inputs[e]) for e, m in models.items()}
        times_fb = measure(variants, clock, warmup=3, iters=5 if quick else 10, rounds=3 if quick else 5)
        for e in (8, 1):
            tf, tb = times_fwd[f"fwd_{e}"], times_fb[f"fb_{e}"]
            rows.append({
                "model": f"{family}/{size}", "experts": e, "static": e == 1, "batch": batch, "image": side,
                "memory_format": memory_format, "dtype": str(dtype).removeprefix("torch."),
                "macs_per_image": macs[e], "fwd_s": tf, "fwd_bwd_s": tb,
                "fwd_images_per_s": batch / tf, "train_images_per_s": batch / tb,
                "fwd_tflops": 2 * macs[e] * batch / tf / 1e12, "fwd_bwd_tflops": 6 * macs[e] * batch / tb / 1e12,
            })
        del models, inputs, variants
        if clock.cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- layer
def bench_layer(name: str, experts: int, batch: int, device, dtype, clock: Clock, quick: bool,
                memory_format: str) -> dict:
    from condmoe.routing.cond_conv2d import CondConv2d

    cin, cout, k, g, hw = LAYER_SHAPES[name]
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_(True)
    rw = torch.rand(batch, experts, device=device, requires_grad=True)  # fp32, as the routers give them
    static = nn.Conv2d(cin, cout, k, padding=k // 2, groups=g, bias=False).to(device, dtype)
    cond = CondConv2d(cin, cout, k, padding=k // 2, groups=g, bias=False, num_experts=experts).to(device, dtype)
    variants = {
        "static_fwd": _fwd(lambda: static(x)),
        "cond_fwd": _fwd(lambda: cond(x, rw)),
        "static_fb": _fwd_bwd(lambda: static(x), [x, static.weight]),
        "cond_fb": _fwd_bwd(lambda: cond(x, rw), [x, rw, cond.weight]),
    }
    t = measure(variants, clock, warmup=5, iters=10 if quick else 20, rounds=3 if quick else 7)
    return {"shape": name, "experts": experts, "batch": batch, "memory_format": memory_format,
            "dtype": str(dtype).removeprefix("torch."), "times_s": t,
            "fwd_vs_static": t["cond_fwd"] / t["static_fwd"], "fwd_bwd_vs_static": t["cond_fb"] / t["static_fb"]}


# ---------------------------------------------------------------- all-to-all (2 processes)
_A2A = re.compile(r"all_?to_?all|alltoall|sendrecv", re.I)
_ALLREDUCE = re.compile(r"all_?reduce|reduce_?scatter|allgather|all_gather", re.I)


def _device_self_time(evt) -> float:
    """Self time of a profiler event on the accelerator (or the CPU in a dry run), in microseconds."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def alltoall_worker(rank: int, world: int, port: int, out: str, steps: int, batch: int, use_gpu: bool,
                    warmup: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="2")
    from torch.profiler import ProfilerActivity, profile

    from condmoe.trainer.config import job_from_dict
    from condmoe.trainer.engine import build_engine, setup_distributed

    cfg = job_from_dict({
        "model": {"name": "topk_moe_cnn", "size": "small", "experts": 8, "ep_size": world},
        "data": {"path": "/nowhere", "batch_size": batch * world},
        "optim": {"schedule": "constant"},
        "deepspeed": {"bf16": use_gpu, "zero_stage": 1},
        "cluster": {"use_gpu": use_gpu, "workers": world, "threads_per_worker": 2}})
    setup_distributed(cfg)
    engine = build_engine(cfg, world)
    placement = engine.condmoe_placement
    g = torch.Generator().manual_seed(rank)
    x = placement.images(torch.randn(batch, 1, 28, 28, generator=g))
    y = placement.move(torch.randint(0, 10, (batch,), generator=g))

    def step():
        out = engine(x, y)
        engine.backward(out.loss)
        engine.step()

    clock = Clock(placement.device)
    step_s = measure({"step": step}, clock, warmup=warmup, iters=steps, rounds=3)["step"]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if use_gpu:
            torch.cuda.synchronize()
    from torch.autograd import DeviceType

    a2a = reduce_ = 0.0
    names = set()
    for evt in prof.key_averages():
        # on a GPU: NCCL's kernels only (the CPU-side ops that launch them carry the same device time)
        if use_gpu and (evt.device_type != DeviceType.CUDA or "nccl" not in evt.key.lower()):
            continue
        us = _device_self_time(evt) if use_gpu else float(getattr(evt, "self_cpu_time_total", 0.0))
        if us <= 0:
            continue
        if _A2A.search(evt.key):
            a2a += us
            names.add(evt.key[:80])
        elif _ALLREDUCE.search(evt.key):
            reduce_ += us
    if rank == 0:
        res = {"world": world, "batch_per_rank": batch, "steps_profiled": steps, "step_s": step_s,
               "alltoall_s_per_step": a2a / 1e6 / steps, "other_collectives_s_per_step": reduce_ / 1e6 / steps,
               "alltoall_share": a2a / 1e6 / steps / step_s, "kernels": sorted(names),
               "device": str(placement.device), "dtype": str(placement.dtype).removeprefix("torch.")}
        Path(out).write_text(json.dumps(res))


def bench_alltoall(quick: bool, use_gpu: bool) -> dict:
    import torch.multiprocessing as mp

    from condmoe.trainer.engine import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "a2a.json")
        steps, batch, warmup = ((10, 256, 5) if quick else (30, 512, 10)) if use_gpu else (2, 16, 1)
        ctx = mp.start_processes(alltoall_worker, args=(2, free_port(), out, steps, batch, use_gpu, warmup),
                                 nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + (150 if quick else 400) * (1 if use_gpu else 3)
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError("the all-to-all workers did not finish in time")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return json.loads(Path(out).read_text())


# ---------------------------------------------------------------- main
def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                   capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and rounds (well under 3 minutes)")
    p.add_argument("--parts", nargs="+", choices=["network", "layer", "alltoall"],
                   default=["network", "layer", "alltoall"])
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--layer-batch", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU to check the script (numbers mean nothing)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        build = "a build without CUDA" if not torch.version.cuda else f"CUDA {torch.version.cuda}, no device visible"
        print(f"benchmarks/gpu.py: no CUDA GPU here (torch {torch.__version__}, {build}): nothing measured; "
              "run it on a GPU machine (benchmarks/gpu_check.sh)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")  # top-k builds DeepSpeed's MoE layer
    if cuda:
        torch.cuda.set_device(device)
    dtype, clock, failed = torch.bfloat16, Clock(device), []
    t_start = time.monotonic()
    env = _environment(device)
    result: dict = {"environment": env, "quick": args.quick, "targets": {"e8_3x3_vs_static_max": TARGET_E8_3X3}}
    print(f"GPU benchmark on {env.get('name', env['device'])} (torch {env['torch']}, CUDA {env['cuda']})"
          f"{' --quick' if args.quick else ''}" + ("" if cuda else "  [CPU dry run: numbers mean nothing]"))

    if "network" in args.parts:
        nets = NETWORKS[:1] if args.quick else NETWORKS
        rows = []
        print("\nnetwork (bf16; fwd+bwd TFLOP/s = 6 x multiply-adds x images / time)")
        head = (f"{'model':<28}{'E':>3} {'format':<14}{'MAdds/img':>11}{'fwd img/s':>12}{'f+b img/s':>12}"
                f"{'fwd TFLOP/s':>12}{'f+b TFLOP/s':>12}")
        print(head + "\n" + "-" * len(head))
        for family, size, side, ch, classes, batch in nets:
            if not cuda:
                batch = min(batch, 32)
            try:
                got = bench_network(family, size, side, ch, classes, batch, device, dtype, clock, args.quick)
            except (ValueError, KeyError, RuntimeError) as err:  # a family not registered / out of memory
                print(f"{family}/{size}: skipped ({str(err).splitlines()[0][:100]})")
                rows.append({"model": f"{family}/{size}", "skipped": str(err).splitlines()[0]})
                continue
            for r in got:
                print(f"{r['model']:<28}{r['experts']:>3} {r['memory_format']:<14}{r['macs_per_image'] / 1e6:>10.2f}M"
                      f"{r['fwd_images_per_s']:>12.0f}{r['train_images_per_s']:>12.0f}{r['fwd_tflops']:>12.2f}"
                      f"{r['fwd_bwd_tflops']:>12.2f}", flush=True)
            rows += got
        result["network"] = rows

    if "layer" in args.parts:
        shapes = QUICK_LAYER_SHAPES if args.quick else tuple(LAYER_SHAPES)
        formats = ("nchw",) if args.quick else ("nchw", "channels_last")
        batch = args.layer_batch if cuda else 8
        rows = []
        print(f"\nCondConv2d vs static nn.Conv2d (bf16, batch {batch}; time ratios, median of rounds)")
        head = f"{'shape':<22}{'format':<14}{'E':>3}  {'fwd/static':>10} {'f+b/static':>10}"
        print(head + "\n" + "-" * len(head))
        for fmt in formats:
            for name in shapes:
                for e in args.experts:
                    try:
                        r = bench_layer(name, e, batch, device, dtype, clock, args.quick, fmt)
                    except RuntimeError as err:  # recorded; the rest still runs
                        first = (str(err).strip().splitlines() or ["RuntimeError"])[0][:200]
                        rows.append({"shape": name, "experts": e, "memory_format": fmt, "error": first})
                        failed.append(f"layer {name} E={e} {fmt}")
                        print(f"{name:<22}{fmt:<14}{e:>3}  FAILED: {first[:80]}")
                        continue
                    rows.append(r)
                    print(f"{name:<22}{fmt:<14}{e:>3}  {r['fwd_vs_static']:>9.2f}x {r['fwd_bwd_vs_static']:>9.2f}x",
                          flush=True)
        result["layer"] = rows
        at8 = [r for r in rows if r["experts"] == 8 and r["shape"].startswith("3x3") and "error" not in r]
        verdict = [{"shape": r["shape"], "memory_format": r["memory_format"],
                    "fwd_ok": r["fwd_vs_static"] <= TARGET_E8_3X3,
                    "fwd_bwd_ok": r["fwd_bwd_vs_static"] <= TARGET_E8_3X3} for r in at8]
        result["target_e8_3x3"] = verdict
        print(f"\ntarget at E=8, 3x3: CondConv2d <= {TARGET_E8_3X3}x static")
        for v in verdict:
            print(f"  {v['shape']:<22}{v['memory_format']:<14} fwd {'ok' if v['fwd_ok'] else 'MISS'}"
                  f"  f+b {'ok' if v['fwd_bwd_ok'] else 'MISS'}")

    if "alltoall" in args.parts:
        a2a = None
        gpus = torch.cuda.device_count() if cuda else 0
        if cuda and gpus < 2:
            result["alltoall"] = {"skipped": f"needs 2 GPUs, this machine has {gpus}"}
            print(f"\nall-to-all: skipped (needs 2 GPUs, this machine has {gpus})")
        else:
            try:
                a2a = bench_alltoall(args.quick, use_gpu=cuda)
            except Exception as err:  # noqa: BLE001 -- recorded; the other parts' results are still written
                first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                result["alltoall"] = {"error": f"{type(err).__name__}: {first}"}
                failed.append("alltoall")
                print(f"\nall-to-all: FAILED ({type(err).__name__}: {first})")
                a2a = None
        if a2a is not None:
            result["alltoall"] = a2a
            print(f"\ntop-k MoE step on 2 {'GPUs' if cuda else 'CPU processes'} (topk_moe_cnn/small, 8 experts, "
                  f"ep_size 2, {a2a['batch_per_rank']} images per rank): {a2a['step_s'] * 1e3:.2f} ms per step, "
                  f"all-to-all {a2a['alltoall_s_per_step'] * 1e3:.2f} ms = {a2a['alltoall_share']:.1%} of the step "
                  f"(other collectives {a2a['other_collectives_s_per_step'] * 1e3:.2f} ms)")

    result["failed_parts"] = failed
    result["seconds"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['seconds']:.0f} s; wrote {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
