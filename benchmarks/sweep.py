"""The cost of running trials as a `condmoe sweep` (Ray Tune) against the same trials one by one.

Same machine, same run, the same trial jobs (the sweep's own trial configs):

- one by one: each trial as its own ``condmoe train`` process (an embedded Ray each), back to back;
- sweep, one at a time: ``condmoe sweep --max-concurrent 1`` (one embedded Ray, Tune, the trial as a
  Tune function that runs the job's Ray Train workers): the sweep's overhead is its wall time
  minus the one-by-one wall time, the parallelism being the same;
- sweep, as many at once as the CPUs hold (the default): what a sweep gains from concurrency;
- the resumed sweep (every trial already done): the cost of a restart that has nothing to run.

Prints a table and writes benchmarks/results/sweep.json.

    python benchmarks/sweep.py [--model condconv_cnn --size tiny --experts 1,2 --seeds 2 --steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="condconv_cnn")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--experts", default="1,2", help="grid values of model.experts")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--data", default=None, help="shards (default: a 768-image Fashion-MNIST slice, written)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep.json")
    args = ap.parse_args()

    from condmoe.cluster.sweep import make_spec
    from condmoe.trainer.config import dump_job

    work = Path(tempfile.mkdtemp(prefix="condmoe-sweep-bench-"))
    ray_tmp = tempfile.mkdtemp(prefix="cmsb", dir="/tmp")  # short: unix socket paths
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    data = args.data
    if data is None:
        data = str(work / "shards")
        subprocess.run([str(BIN / "condmoe"), "shards", "write", "fashion_mnist", data, "--limit", "768"],
                       check=True, capture_output=True, env=env)
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": {"name": args.model, "size": args.size, "experts": 2},
        "data": {"path": data, "batch_size": 32, "eval_batch_size": 256},
        "optim": {"steps": args.steps, "lr": 0.005, "schedule": "constant"},
        "checkpoint": {"every": 0}, "metrics": {"log_every": 2, "prometheus": {"port": 0}},
        "cluster": {"workers": 1, "storage_path": str(work / "runs")}}))
    grid = [f"model.experts={args.experts}"]
    spec = make_spec(str(job), grid=grid, seeds=args.seeds, name="bench", exit_thresholds=None)
    trials = spec.trials()

    # one by one: the sweep's own trial jobs, each a `condmoe train` of its own
    seq = []
    for t in trials:
        cfg = spec.trial_job(t)
        cfg.cluster.name = f"seq-{t.trial_id}"
        cfg.cluster.storage_path = str(work / "seq")
        path = work / f"seq-{t.trial_id}.yaml"
        path.write_text(dump_job(cfg))
        seq.append(_timed([str(BIN / "condmoe"), "train", str(path), "--json"], env))
        print(f"one by one: {t.trial_id} {seq[-1]:.1f} s", flush=True)

    def sweep(name: str, *extra: str) -> float:
        return _timed([str(BIN / "condmoe"), "sweep", str(job), "--grid", grid[0], "--seeds", str(args.seeds),
                       "--name", name, "--exit-thresholds", "none", "--json", *extra], env)

    one_at_a_time = sweep("bench-serial", "--max-concurrent", "1")
    print(f"sweep, one at a time: {one_at_a_time:.1f} s", flush=True)
    concurrent = sweep("bench-parallel")
    print(f"sweep, concurrent: {concurrent:.1f} s", flush=True)
    resumed = sweep("bench-parallel")
    total_seq = sum(seq)
    result = {
        "trials": len(trials), "model": args.model, "size": args.size, "steps": args.steps,
        "cpus": os.cpu_count(), "one_by_one_s": seq, "one_by_one_total_s": total_seq,
        "sweep_serial_s": one_at_a_time, "sweep_concurrent_s": concurrent, "sweep_resume_nothing_s": resumed,
        "overhead_serial_s": one_at_a_time - total_seq,
        "overhead_serial_ratio": one_at_a_time / total_seq,
        "speedup_concurrent": total_seq / concurrent,
    }
    print()
    print(f"{'':34s} {'wall s':>8s} {'per trial s':>12s} {'vs one by one':>14s}")
    print(f"{'one by one (condmoe train each)':34s} {total_seq:8.1f} {total_seq / len(trials):12.1f} {1.0:13.2f}x")
    for label, value in (("sweep, 1 at a time", one_at_a_time), ("sweep, concurrent", concurrent),
                         ("sweep restarted, nothing to run", resumed)):
        print(f"{label:34s} {value:8.1f} {value / len(trials):12.1f} {value / total_seq:13.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
