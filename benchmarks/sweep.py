"""The cost of running trials as a `condmoe sweep` (Ray Tune) against the same trials one by one.

Same machine, same run, the same trial jobs (the sweep's own trial configs):

- one by one: each trial as its own ``condmoe train`` process (an embedded Ray each), back to back;
- sweep, one at a time: ``condmoe sweep --max-concurrent 1`` (one embedded Ray, Tune, the trial as a
  Tune function that runs the job's Ray Train workers): the sweep's overhead is its wall time
  minus the one-by-one wall time, the parallelism being the same;
- sweep, as many at once as the CPUs hold (the default): what a sweep gains from concurrency;
- the resumed sweep (every trial already done): the cost of a restart that has nothing to run.

Each mode runs once per round, the order reversed every other round (the machine's load may drift);
medians are reported. Prints a table and writes benchmarks/results/sweep.json.

    python benchmarks/sweep.py [--model condconv_cnn --size tiny --experts 1,2 --seeds 2 --steps 4]
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

import yaml

BIN = Path(sys.executable).parent


RETRIES: list[str] = []  # commands run again because Ray did not start (its fixed 30 s raylet wait)


def _timed(cmd: list[str], env: dict) -> float:
    for attempt in range(3):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode == 0:
            return time.perf_counter() - t0
        if "timed out during startup" not in p.stderr or attempt == 2:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
        RETRIES.append(" ".join(cmd[1:4]))
        print(f"Ray did not start in time (a busy machine): again: {' '.join(cmd[1:4])}", flush=True)
    raise AssertionError("unreachable")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="condconv_cnn")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--experts", default="1,2", help="grid values of model.experts")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="rounds, in alternating order; medians reported")
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

    def one_by_one(r: int) -> float:
        """The sweep's own trial jobs, each a `condmoe train` of its own, back to back."""
        total = 0.0
        for t in trials:
            cfg = spec.trial_job(t)
            cfg.cluster.name = f"seq{r}-{t.trial_id}"
            cfg.cluster.storage_path = str(work / "seq")
            path = work / f"seq{r}-{t.trial_id}.yaml"
            path.write_text(dump_job(cfg))
            total += _timed([str(BIN / "condmoe"), "train", str(path), "--json"], env)
        return total

    def sweep(name: str, *extra: str) -> float:
        return _timed([str(BIN / "condmoe"), "sweep", str(job), "--grid", grid[0], "--seeds", str(args.seeds),
                       "--name", name, "--exit-thresholds", "none", "--json", *extra], env)

    # rounds in alternating order, so a machine whose load drifts favours neither side
    times: dict[str, list[float]] = {"one_by_one": [], "sweep_serial": [], "sweep_concurrent": []}
    for r in range(args.rounds):
        order = ["one_by_one", "sweep_serial", "sweep_concurrent"]
        for mode in (order if r % 2 == 0 else order[::-1]):
            if mode == "one_by_one":
                value = one_by_one(r)
            elif mode == "sweep_serial":
                value = sweep(f"serial{r}", "--max-concurrent", "1")
            else:
                value = sweep(f"parallel{r}")
            times[mode].append(value)
            print(f"round {r}: {mode} {value:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    resumed = sweep("parallel0")  # every trial done: what a restart with nothing to run costs
    med = {k: statistics.median(v) for k, v in times.items()}
    total_seq, one_at_a_time, concurrent = med["one_by_one"], med["sweep_serial"], med["sweep_concurrent"]
    result = {
        "trials": len(trials), "model": args.model, "size": args.size, "steps": args.steps, "rounds": args.rounds,
        "cpus": os.cpu_count(), "times_s": times, "one_by_one_total_s": total_seq,
        "sweep_serial_s": one_at_a_time, "sweep_concurrent_s": concurrent, "sweep_resume_nothing_s": resumed,
        "overhead_serial_s": one_at_a_time - total_seq,
        "overhead_serial_ratio": one_at_a_time / total_seq,
        "speedup_concurrent": total_seq / concurrent,
        "retried_ray_start": RETRIES, "load_average_at_end": os.getloadavg(),
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
