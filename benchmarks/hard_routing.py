"""Hard-routing speed on CPU: CoE vs dense / run-all-and-mask, CIGT gather vs dense, top-k MoE at ep_size 1 vs 2.

- CoE (arXiv 2107.03815) with E = 2, 4, 8 experts of size S against one dense
  network of size S (= one expert), and against running all E experts on every
  sample and keeping each sample's own ("all+mask"). Inference, no early exit.
- CIGT (arXiv 2402.08345) cigt_lenet "small" (the paper's network) and "base"
  ([1, 2, 4]) in gather/scatter form against the dense run-all-paths-and-mask
  form, whole forward and the routed layers alone (after the shared first
  layer, whose cost both forms pay). Inference.
- Top-k MoE layer (DeepSpeed MoE) at ep_size 1 and 2, two processes on gloo:
  forward throughput (samples/s over both ranks) and the share of the MoE
  layer's time spent in its two all-to-alls (DeepSpeed's wall-clock breakdown;
  host timers around blocking gloo calls, so waiting for the other rank counts).

Routing is spread over all experts / paths (the delegator's and routers' last
layers set so, as after balanced training); a random-init router may send
everything to one expert, which would flatter the routed forms. Every ratio is
measured in one run, variants interleaved round by round (median of rounds).
Prints tables and writes JSON to benchmarks/results/hard_routing.json.

    python benchmarks/hard_routing.py [--batch 128] [--rounds 5] [--threads 1] [--parts coe cigt ep]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from condmoe.routing import build_model
from condmoe.routing.models.coe_cnn import EXPERT_CHANNELS, ExpertCNN
from condmoe.trainer.engine import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "hard_routing.json"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_glibc_malloc() -> bool:
    """Keep freed activation memory in the heap instead of returning it to the OS.

    With glibc's defaults a multi-megabyte activation freed at the end of a forward
    is trimmed back to the OS, and the next forward page-faults it in again:
    measured here that doubled the time of cigt_lenet's 28x28 first layer. PyTorch's
    CPU performance guide recommends jemalloc/tcmalloc for this; glibc's mallopt
    (trim threshold 1 GiB, mmap threshold at its 32 MiB maximum) does the same.
    Returns False where glibc is not available (the benchmark then runs as is).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    except (OSError, AttributeError):
        return False


def _spread_linear(linear: torch.nn.Linear, feats: torch.Tensor, seed: int) -> None:
    """Set a routing FC so its argmax over ``feats`` (N, F) is spread over all outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(linear.weight.shape, generator=g) / feats.std(0).clamp_min(1e-6)
        linear.weight.copy_(w)
        linear.bias.copy_(-w @ feats.mean(0))


def _throughput(fn, batch: int, iters: int) -> float:
    """Samples per second of ``fn`` in steady state (one untimed call first). With one intra-op
    thread the clock is this process's CPU time, which time slices lost to other processes on a
    shared machine do not inflate."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()  # untimed: the previous variant left its own weights and buffers in the caches
    start = clock()
    for _ in range(iters):
        fn()
    return batch * iters / (clock() - start)


def _interleaved(variants: dict, batch: int, rounds: int, iters: int) -> dict[str, float]:
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                samples[name].append(_throughput(fn, batch, iters))
    return {k: max(v) for k, v in samples.items()}


def bench_coe(x: torch.Tensor, experts: list[int], size: str, rounds: int, iters: int,
              delegator_scale: float = 1.0) -> list[dict]:
    from condmoe.routing import count_macs

    torch.manual_seed(0)
    dense = ExpertCNN(EXPERT_CHANNELS[size], in_channels=1, num_classes=10).eval()
    variants = {"dense": lambda: dense(x)}
    loads, coe_macs = {}, {}
    for e in experts:
        torch.manual_seed(0)
        model = build_model("coe_cnn", size, experts=e, delegator_scale=delegator_scale).eval()
        with torch.no_grad():
            _spread_linear(model.delegator.select, model.delegator.features(x), seed=e)
            model(x)
        loads[e] = model.last_stats.load.tolist()
        coe_macs[e] = count_macs(model, x).per_sample
        local = model.experts.local_experts

        def all_and_mask(model=model, local=local):
            d = model.delegator(x)
            outs = torch.stack([ex(x) for ex in local])  # (E, B, K)
            return outs[d.select_logits.argmax(-1), torch.arange(x.shape[0])]

        variants[f"coe_E{e}"] = lambda model=model: model(x)
        variants[f"all_mask_E{e}"] = all_and_mask
        # the dense network on the batch cut into E chunks: CoE's experts see ~B/E samples per call,
        # and on this CPU smaller convolution batches run faster per sample (cache)
        variants[f"dense_chunks_E{e}"] = lambda e=e: [dense(c) for c in x.chunk(e)]
    tput = _interleaved(variants, x.shape[0], rounds, iters)
    dense_macs = count_macs(dense, x).per_sample
    rows = []
    for e in experts:
        coe, mask, chunks = tput[f"coe_E{e}"], tput[f"all_mask_E{e}"], tput[f"dense_chunks_E{e}"]
        rows.append({
            "experts": e, "load": loads[e], "coe_macs_over_dense": coe_macs[e] / dense_macs,
            "dense_sps": tput["dense"], "dense_chunks_sps": chunks, "coe_sps": coe, "all_mask_sps": mask,
            "coe_vs_dense": coe / tput["dense"], "coe_vs_dense_chunks": coe / chunks,
            "coe_vs_all_mask": coe / mask, "coe_vs_all_mask_over_E": coe / mask / e,
            "pass_dense_0.85": coe / tput["dense"] >= 0.85, "pass_mask_0.7E": coe / mask >= 0.7 * e,
        })
    return rows


def bench_cigt(x: torch.Tensor, size: str, rounds: int, iters: int) -> dict:
    from condmoe.routing import count_macs
    from condmoe.routing.cigt import run_routed

    torch.manual_seed(0)
    gather = build_model("cigt_lenet", size, execution="gather").eval()
    dense = build_model("cigt_lenet", size, execution="dense").eval()
    with torch.no_grad():
        h = gather.layers[0][0](x)
        _spread_linear(gather.routers[0].fc2, _router_hidden(gather.routers[0], h), seed=1)
        path = gather.routers[0](h, 1.0)[1].argmax(-1)
        h1 = run_routed(gather.layers[1], h, path)
        _spread_linear(gather.routers[1].fc2, _router_hidden(gather.routers[1], h1), seed=2)
        dense.load_state_dict(gather.state_dict())
        if not torch.allclose(gather(x).logits, dense(x).logits, atol=1e-4):
            raise RuntimeError("gather and dense CIGT disagree")
    loads = [r.last_stats.load.tolist() for r in gather.routers]
    macs_ratio = count_macs(dense, x).per_sample / count_macs(gather, x).per_sample
    tput = _interleaved({"gather": lambda: gather(x), "dense": lambda: dense(x),
                         "gather_routed": lambda: _routed_layers(gather, h),
                         "dense_routed": lambda: _routed_layers(dense, h)}, x.shape[0], rounds, iters)
    speedup = tput["gather"] / tput["dense"]
    return {"size": size, "paths": list(gather.config.paths), "loads": loads, "gather_sps": tput["gather"],
            "dense_sps": tput["dense"], "speedup": speedup, "macs_ratio": macs_ratio, "pass_1.5x": speedup >= 1.5,
            "routed_speedup": tput["gather_routed"] / tput["dense_routed"]}


def _routed_layers(model, h0: torch.Tensor) -> torch.Tensor:
    """The forward after the shared first layer (routers + routed layers), as CIGT.forward runs it."""
    from condmoe.routing.cigt import run_routed

    h, t = h0, model.temperature()
    for l in range(1, len(model.layers)):
        path = model.route(l - 1, h, t, None).indices[:, 0]
        h = run_routed(model.layers[l], h, path, model.config.execution)
    return h


def _router_hidden(router, h: torch.Tensor) -> torch.Tensor:
    return router.bn(torch.relu(router.fc1(router.pool(h).flatten(1))))


def _ep_worker(rank: int, world: int, port: int, batch: int, experts: int, rounds: int, iters: int, threads: int,
               malloc_tuned: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    if malloc_tuned:
        tune_glibc_malloc()
    import deepspeed
    import torch.distributed as dist

    from condmoe.routing.models.topk_moe_cnn import conv_expert
    from condmoe.routing.topk_moe import ImageExpert, TopKMoE

    from condmoe.trainer.ds_ops import load_ops


    load_ops()  # clears a build lock left by a killed process

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    shape = (32, 7, 7)  # topk_moe_cnn "small" tokens
    d = shape[0] * shape[1] * shape[2]
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(rank))
    layers = {}
    for ep in (1, 2):
        torch.manual_seed(0)
        layers[ep] = TopKMoE(d, ImageExpert(conv_expert(shape[0]), shape), experts, k=1, ep_size=ep,
                             eval_capacity_factor=1.25, min_capacity=1, stats_over_group=False).eval()
        layers[ep].moe.deepspeed_moe.wall_clock_breakdown = True
    times: dict[int, list[float]] = {1: [], 2: []}
    shares: dict[int, list[float]] = {1: [], 2: []}
    with torch.no_grad():
        for _ in range(rounds):
            for ep, layer in layers.items():
                moe = layer.moe.deepspeed_moe
                layer(x)
                for name in ("moe", "1st_a2a", "2nd_a2a"):
                    moe.timers(name).reset()
                dist.barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    layer(x)
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[ep].append(elapsed.item())
                total = moe.timers("moe").elapsed(reset=False)
                a2a = moe.timers("1st_a2a").elapsed(reset=False) + moe.timers("2nd_a2a").elapsed(reset=False)
                shares[ep].append(a2a / total if total > 0 else 0.0)
    results = {ep: {"samples_per_s": world * batch * iters / min(times[ep]),
                    "a2a_share": statistics.median(shares[ep])} for ep in layers}
    if rank == 0:
        torch.save(results, out)


def bench_topk_ep(batch: int, experts: int, rounds: int, iters: int, threads: int,
                  malloc_tuned: bool) -> list[dict]:
    out = RESULTS.parent / "_ep_tmp.pt"
    out.parent.mkdir(parents=True, exist_ok=True)  # the workers write their timings here (a fresh clone has none)
    ctx = mp.start_processes(_ep_worker, args=(2, free_port(), batch, experts, rounds, iters, threads, malloc_tuned,
                                               str(out)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 600
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("ep benchmark workers did not finish in 600 s")
    res = torch.load(out)
    out.unlink()
    return [{"ep_size": ep, "experts": experts, "processes": 2, "batch_per_rank": batch, **res[ep],
             "vs_ep1": res[ep]["samples_per_s"] / res[1]["samples_per_s"]} for ep in (1, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--size", default="small", help="coe_cnn size (each expert = the dense network)")
    ap.add_argument("--delegator-scale", type=float, default=1.0, help="coe_cnn delegator_scale option")
    ap.add_argument("--cigt-sizes", nargs="+", default=["small", "base"])
    ap.add_argument("--ep-experts", type=int, default=8)
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned: keep freed activations in the heap (see tune_glibc_malloc)")
    ap.add_argument("--parts", nargs="+", choices=["coe", "cigt", "ep"], default=["coe", "cigt", "ep"],
                    help="which parts to run (ep: the 2-process top-k part)")
    args = ap.parse_args()
    args.malloc_tuned = tune_glibc_malloc() if args.malloc == "tuned" else False
    torch.set_num_threads(args.threads)
    print(f"allocator: glibc {'tuned (no trimming of freed activations)' if args.malloc_tuned else 'defaults'}")
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    coe = (bench_coe(x, args.experts, args.size, args.rounds, args.iters, args.delegator_scale)
           if "coe" in args.parts else [])
    if coe:
        print(f"\nCoE ({args.size} experts) vs dense / all-experts+mask, forward, batch {args.batch}, "
              f"{args.threads} thread(s), samples/s")
        print(f"{'E':>3} {'dense':>7} {'dense@B/E':>9} {'CoE':>7} {'all+mask':>8} {'CoE/dense':>9} {'CoE/d@B/E':>9} "
              f"{'CoE/mask':>8} {'/E':>5} {'MAdds':>6}  load")
        for r in coe:
            print(f"{r['experts']:>3} {r['dense_sps']:>7.0f} {r['dense_chunks_sps']:>9.0f} {r['coe_sps']:>7.0f} "
                  f"{r['all_mask_sps']:>8.0f} {r['coe_vs_dense']:>9.2f} {r['coe_vs_dense_chunks']:>9.2f} "
                  f"{r['coe_vs_all_mask']:>8.2f} {r['coe_vs_all_mask_over_E']:>5.2f} {r['coe_macs_over_dense']:>6.3f}  "
                  f"{[int(v) for v in r['load']]}")

    cigt = [bench_cigt(x, size, args.rounds, args.iters) for size in args.cigt_sizes] if "cigt" in args.parts else []
    if cigt:
        print(f"\nCIGT cigt_lenet [1, 2, 4], gather/scatter vs dense run-all-paths+mask, forward, batch {args.batch}, "
              "samples/s")
        print(f"{'size':>6} {'gather':>8} {'dense':>8} {'speed-up':>9} {'MAdds ratio':>12} "
              f"{'routed layers only':>19}  loads")
        for r in cigt:
            print(f"{r['size']:>6} {r['gather_sps']:>8.0f} {r['dense_sps']:>8.0f} {r['speedup']:>8.2f}x "
                  f"{r['macs_ratio']:>11.2f}x {r['routed_speedup']:>18.2f}x  "
                  f"{[[int(v) for v in load] for load in r['loads']]}")

    ep = []
    if "ep" in args.parts:
        ep = bench_topk_ep(args.batch, args.ep_experts, args.rounds, args.iters, args.threads, args.malloc_tuned)
        print(f"\nTop-k MoE layer (k=1, {args.ep_experts} conv experts, tokens (32,7,7)), 2 processes gloo, "
              f"forward, batch {args.batch}/rank")
        print(f"{'ep_size':>7} {'samples/s':>10} {'vs ep1':>7} {'all-to-all share':>17}")
        for r in ep:
            print(f"{r['ep_size']:>7} {r['samples_per_s']:>10.0f} {r['vs_ep1']:>7.2f} {r['a2a_share']:>17.1%}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": vars(args), "torch": torch.__version__, "coe": coe, "cigt": cigt,
                                   "topk_ep": ep}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
