"""`make results`: the seed papers' claims checked on Fashion-MNIST, five comparisons as condmoe sweeps.

Each comparison is one `condmoe sweep` of a shipped job (condmoe:NAME) with named variants and 3
seeds, every variant trained with the same budget (steps x batch size) within its comparison, then
`condmoe sweep report`. The commands are printed as they run and collected, with the tables and the
timings, in OUT/results.md (docs/results.md is written from it).

    python benchmarks/results.py [--out runs/results] [--data data/fashion_mnist] [--seeds 3] [--smoke]
    python benchmarks/results.py --only condconv,coe     # some comparisons

--smoke: 2 training steps on a 768-image slice (its own shard folder), 1 seed: proves the pipeline.
Sizes and steps (why: docs/results.md): every network at size "tiny", batch 64, one worker per
trial, as many trials at once as the CPUs hold; CondConv, BasisNet and top-k 3000 steps (3.2
epochs), CoE and CIGT 1500 steps (CoE trains all 4 experts on every sample, CIGT's thick baseline
is 3.6x the multiply-adds). A finished sweep is not run again (`condmoe sweep` resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

# name: (shipped job, steps, sweep arguments, what the paper claims)
COMPARISONS: dict[str, tuple[str, int, list[str], str]] = {
    "condconv": ("condmoe:condconv", 3000, ["--grid", "model.experts=1,4,8"],
                 "CondConv (arXiv 1904.04971): higher accuracy than the static network of the same shape "
                 "(E = 1) at a small multiply-add overhead (EfficientNet-B0: +1.0 point at +6% MAdds)"),
    "basisnet": ("condmoe:basisnet", 3000,
                 ["--variant", "basisnet",
                  "--variant", "specialist-static", "model.name=condconv_cnn", "model.experts=1",
                  "--variant", "light-alone", "model.name=light_cnn"],
                 "BasisNet (arXiv 2105.03014): early exit keeps accuracy (-0.3 points) at 0.68x the "
                 "multiply-adds; the synthesised specialist beats a single static network"),
    "coe": ("condmoe:coe", 1500,
            ["--set", "model.ep_size=1",
             "--variant", "coe",
             "--variant", "one-expert", "model.name=expert_cnn",
             "--variant", "dense-same-cost", "model.name=expert_cnn", "model.options={width: 1.1}"],
            "CoE (arXiv 2107.03815): delegator + one of E experts beats one expert alone and a dense "
            "network of the same cost; early exit lowers the cost further"),
    "cigt": ("condmoe:cigt", 1500,
             ["--set", "model.options.warmup_steps=250", "--set", "model.options.temperature_decay=0.99632",
              "--variant", "cigt",
              "--variant", "thin", "model.experts=1", "model.options.paths=[1,1,1]",
              "--variant", "thick", "model.size=small", "model.experts=1", "model.options.paths=[1,1,1]"],
             "CIGT (arXiv 2402.08345): comparable or better accuracy than the thick single-path network "
             "at a fraction of its compute (Fashion-MNIST: 92.37% vs thick 92.25%, thin 91.65%)"),
    "topk": ("condmoe:topk_moe", 3000,
             ["--set", "model.ep_size=1",
              "--variant", "dense", "model.experts=1",
              "--variant", "k1", "model.options.k=1",
              "--variant", "k2", "model.options.k=2"],
             "top-k MoE (GShard / Switch): more parameters at (nearly) the cost of the dense network, "
             "k = 2 at about twice the expert compute"),
}

# the same recipe for every comparison (the equal training budget: steps x batch 64)
COMMON = ["model.size=tiny", "data.batch_size=64", "data.eval_batch_size=500", "optim.lr=0.005",
          "optim.schedule=warmup_decay", "checkpoint.keep_last=1", "metrics.eval_every=0",
          "metrics.prometheus.port=0", "cluster.workers=1", "cluster.cpus_per_worker=1",
          "cluster.threads_per_worker=1", "cluster.max_failures=1"]


def _run(cmd: list[str], log: list[dict], **kw) -> subprocess.CompletedProcess:
    text = shlex.join(cmd).replace(str(BIN) + "/", "")
    print(f"$ {text}", flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, text=True, **kw)
    log.append({"command": text, "seconds": time.time() - t0, "rc": p.returncode})
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {text}\n{(p.stderr or '')[-3000:]}")
    return p


def shards(data: Path, smoke: bool, log: list[dict]) -> Path:
    if (data / "manifest.parquet").is_file():
        return data
    cmd = [str(BIN / "condmoe"), "shards", "write", "fashion_mnist", str(data)]
    _run(cmd + (["--limit", "768"] if smoke else []), log)
    return data


def sweep_command(name: str, data: Path, out: Path, seeds: int, smoke: bool) -> list[str]:
    job, steps, args, _ = COMPARISONS[name]
    steps = 2 if smoke else steps
    sets = [*COMMON, f"data.path={data}", f"cluster.storage_path={out}", f"optim.steps={steps}",
            f"optim.warmup_steps={0 if smoke else steps // 20}", f"metrics.log_every={1 if smoke else 100}"]
    cmd = [str(BIN / "condmoe"), "sweep", job, "--name", name, "--seeds", str(seeds), "--json"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/results", help="folder of the sweeps and results.md "
                                                                           "(default runs/results)")
    ap.add_argument("--data", default=None, help="Fashion-MNIST shards (written when missing; default "
                                                 "data/fashion_mnist, smoke: OUT/shards-smoke)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3, smoke 1)")
    ap.add_argument("--only", default=None, help="comma-separated comparisons (default: all five)")
    ap.add_argument("--smoke", action="store_true", help="2 steps on a 768-image slice: the pipeline only")
    ap.add_argument("--print-commands", action="store_true",
                    help="print the sweep commands (paths as given, relative ones stay relative) and exit")
    args = ap.parse_args()
    if args.print_commands:
        for name in (args.only.split(",") if args.only else COMPARISONS):
            cmd = sweep_command(name, Path(args.data or "data/fashion_mnist"), Path(args.out),
                                args.seeds or (1 if args.smoke else 3), args.smoke)
            print(shlex.join(["condmoe", *cmd[1:]]) + "\n")
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data or (out / "shards-smoke" if args.smoke else ROOT / "data" / "fashion_mnist")).resolve()
    seeds = args.seeds or (1 if args.smoke else 3)
    names = args.only.split(",") if args.only else list(COMPARISONS)
    unknown = [n for n in names if n not in COMPARISONS]
    if unknown:
        raise SystemExit(f"unknown comparison(s) {unknown}; known: {', '.join(COMPARISONS)}")
    log: list[dict] = []
    t0 = time.time()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    shards(data, args.smoke, log)
    sections = []
    for name in names:
        t = time.time()
        res = json.loads(_run(sweep_command(name, data, out, seeds, args.smoke), log, capture_output=True).stdout)
        _run([str(BIN / "condmoe"), "sweep", "report", str(out / name)], log, capture_output=True)
        summary = (out / name / "report" / "summary.md").read_text()
        failed = f" ({len(res['failed'])} trials FAILED: {res['failed']})" if res["failed"] else ""
        sections.append(f"## {name}\n\n{COMPARISONS[name][3]}\n\n{summary}\n"
                        f"sweep wall time {time.time() - t:.0f} s, {res['max_concurrent']} trials at once"
                        f"{failed}; plots: {out / name / 'report'}\n")
        print(f"{name}: {time.time() - t:.0f} s", flush=True)
    total = time.time() - t0
    commands = "\n".join(f"{c['command']}   # {c['seconds']:.0f} s" for c in log)
    (out / "results.md").write_text(f"# condmoe results ({'smoke' if args.smoke else 'full'} run)\n\n"
                                    f"total {total:.0f} s on {os.cpu_count()} CPUs\n\n"
                                    + "\n".join(sections) + f"\n## commands\n\n```\n{commands}\n```\n")
    (out / "timing.json").write_text(json.dumps({"total_s": total, "commands": log}, indent=1) + "\n")
    print(f"total {total:.0f} s; wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
