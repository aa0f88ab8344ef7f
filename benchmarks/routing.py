"""CondConv2d speed against a static nn.Conv2d and the naive E-convolution sum (CPU).

Every ratio is measured in one run with the variants interleaved round by round
(median of rounds), so machine noise hits them alike. Prints a table and writes
JSON to benchmarks/results/routing.json.

    python benchmarks/routing.py [--rounds 7] [--experts 4 8 16] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from condmoe.routing.cond_conv2d import CondConv2d, naive_cond_conv2d

SHAPES = {
    # name: (in, out, kernel, groups, spatial)
    "3x3 64->64 @32x32": (64, 64, 3, 1, 32),
    "1x1 128->128 @16x16": (128, 128, 1, 1, 16),
    "dw3x3 64 @32x32": (64, 64, 3, 64, 32),
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time(fn) -> float:
    start = _clock()
    fn()
    return _clock() - start


def _fwd(f):
    def run():
        with torch.no_grad():
            f()
    return run


def _fwd_bwd(f, params):
    def run():
        y = f()
        y.backward(torch.ones_like(y))
        for p in params:
            p.grad = None
    return run


def bench_shape(name: str, experts: int, batch: int, rounds: int, include_conv_path: bool) -> dict:
    cin, cout, k, g, hw = SHAPES[name]
    torch.manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, requires_grad=True)
    rw = torch.rand(batch, experts)
    static = nn.Conv2d(cin, cout, k, padding=k // 2, groups=g, bias=False)
    cond = CondConv2d(cin, cout, k, padding=k // 2, groups=g, bias=False, num_experts=experts)
    variants = {
        "static_fwd": _fwd(lambda: static(x)),
        "static_fb": _fwd_bwd(lambda: static(x), [x, static.weight]),
        "cond_fwd": _fwd(lambda: cond(x, rw)),
        "cond_fb": _fwd_bwd(lambda: cond(x, rw), [x, cond.weight]),
        "naive_fwd": _fwd(lambda: naive_cond_conv2d(cond, x, rw)),
        "naive_fb": _fwd_bwd(lambda: naive_cond_conv2d(cond, x, rw), [x, cond.weight]),
    }
    if not cond.pointwise:
        # the whole batch in one grouped convolution, to justify the chunking
        whole = CondConv2d(cin, cout, k, padding=k // 2, groups=g, bias=False, num_experts=experts)
        whole.chunk_bytes = 1 << 62
        variants["whole_fwd"] = _fwd(lambda: whole(x, rw))
        variants["whole_fb"] = _fwd_bwd(lambda: whole(x, rw), [x, whole.weight])
    if include_conv_path and cond.pointwise:
        # the grouped-convolution form on a 1x1 layer, to justify the batched-matmul choice
        grouped = CondConv2d(cin, cout, k, padding=k // 2, groups=g, bias=False, num_experts=experts)
        grouped.pointwise = False
        variants["grouped_fwd"] = _fwd(lambda: grouped(x, rw))
        variants["grouped_fb"] = _fwd_bwd(lambda: grouped(x, rw), [x, grouped.weight])
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            samples[key].append(_time(fn))
    t = {k: statistics.median(v) for k, v in samples.items()}
    row = {
        "shape": name,
        "experts": experts,
        "batch": batch,
        "times_s": t,
        "fwd_vs_static": t["cond_fwd"] / t["static_fwd"],
        "fwd_bwd_vs_static": t["cond_fb"] / t["static_fb"],
        "naive_fwd_vs_static": t["naive_fwd"] / t["static_fwd"],
        "speedup_vs_naive_fwd": t["naive_fwd"] / t["cond_fwd"],
        "speedup_vs_naive_fwd_bwd": t["naive_fb"] / t["cond_fb"],
    }
    if "whole_fwd" in t:
        row["chunk_speedup_fwd"] = t["whole_fwd"] / t["cond_fwd"]
        row["chunk_speedup_fwd_bwd"] = t["whole_fb"] / t["cond_fb"]
    if "grouped_fwd" in t:
        row["bmm_speedup_vs_grouped_fwd"] = t["grouped_fwd"] / t["cond_fwd"]
        row["bmm_speedup_vs_grouped_fwd_bwd"] = t["grouped_fb"] / t["cond_fb"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (steadier on a shared machine; use with --threads 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "routing.json")
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    header = (f"{'shape':<22}{'E':>3}  {'fwd/static':>10} {'f+b/static':>10} {'naive/cond fwd':>14} "
              f"{'naive/cond f+b':>14} {'alt/cond fwd':>12} {'alt/cond f+b':>12}")
    print(f"CondConv2d on CPU, batch {args.batch}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"median of {args.rounds} rounds")
    print(header)
    print("-" * len(header))
    for name in SHAPES:
        for e in args.experts:
            row = bench_shape(name, e, args.batch, args.rounds, include_conv_path=True)
            rows.append(row)
            alt_f = row.get("bmm_speedup_vs_grouped_fwd", row.get("chunk_speedup_fwd"))
            alt_b = row.get("bmm_speedup_vs_grouped_fwd_bwd", row.get("chunk_speedup_fwd_bwd"))
            print(f"{name:<22}{e:>3}  {row['fwd_vs_static']:>9.2f}x {row['fwd_bwd_vs_static']:>9.2f}x "
                  f"{row['speedup_vs_naive_fwd']:>13.1f}x {row['speedup_vs_naive_fwd_bwd']:>13.1f}x "
                  f"{alt_f:>11.2f}x {alt_b:>11.2f}x", flush=True)
    targets = {"fwd_vs_static_max": 1.15, "fwd_bwd_vs_static_max": 1.3, "speedup_vs_naive_min": 5.0}
    at8 = [r for r in rows if r["experts"] == 8]
    print("\ntargets at E=8: forward <= 1.15x static, forward+backward <= 1.3x, >= 5x faster than naive")
    for r in at8:
        ok = (r["fwd_vs_static"] <= 1.15, r["fwd_bwd_vs_static"] <= 1.3, r["speedup_vs_naive_fwd"] >= 5.0)
        print(f"  {r['shape']:<22} fwd {'ok' if ok[0] else 'MISS'}  f+b {'ok' if ok[1] else 'MISS'}  "
              f"vs naive {'ok' if ok[2] else 'MISS'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "clock": args.clock, "targets": targets, "rows": rows}, indent=2))
    print("alt/cond: time of the alternative form over condmoe's: whole-batch grouped conv (k > 1 rows,"
          " condmoe chunks the batch) or grouped conv (1x1 rows, condmoe uses a batched matmul)")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
