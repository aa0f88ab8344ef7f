"""ImageNet-scale training on the photo path, CPU: CondConv-EfficientNet-B0 vs the static B0, reader, memory.

Measured in one run, from generated photo-like JPEG shards (``photolike:``, original JPEG bytes,
decoded, RandomResizedCrop-ped and flipped per sample at ``--resolution``):

- training images/s of ``condmoe train configs/condconv_efficientnet_b0.yaml`` (the job as
  shipped: RMSProp, EMA, label smoothing, ZeRO 2, one loader process per worker) with 8 experts
  against the static EfficientNet-B0 (``model.experts=1``, the same network without routing),
  with 1 and 2 workers; the four variants run once per round, interleaved (load drifts on a shared
  host), and the time-per-step ratio 8 experts / static is paired by round (the paper's cost is
  +5.6% multiply-adds; target <= 1.15x). A variant's rate is the median of its log intervals after
  the first (warm-up) one;
- whether the reader keeps up: the loop times its own wait for every micro-batch; the job's
  Prometheus exporter publishes it (``condmoe_data_wait_seconds``) beside the step time
  (``condmoe_train_step_duration_seconds``), scraped here while the job runs: data wait as a share
  of step time over the steps after the first log interval (target < 5%);
- peak memory (VmHWM) of each job's RayTrainWorker processes, and for every ImageNet-scale job of
  configs/ at batch 32 (224x224; 32x32 for cigt_resnet): condmoe's train loop in a fresh process
  on a world of one (ZeRO stage 0, the job's optimiser, EMA where the job has it), two
  forward + backward + optimiser steps; VmHWM after those steps (``train``) and after the run's
  evaluation and checkpoint (``run``), with the process's size after imports (``base``).

Prints tables and writes benchmarks/results/imagenet_train.json.

    python benchmarks/imagenet_train.py [--steps 12 --batch 8 --rounds 2 --images 640]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# the ImageNet-scale jobs of configs/ and the resolution memory is measured at
MEMORY_JOBS = {"condconv_efficientnet_b0": 224, "condconv_mobilenet_v1": 224, "condconv_mobilenet_v2": 224,
               "basisnet_mobilenet_v3": 224, "coe_mobilenet": 224, "cigt_resnet": 32}
_SAMPLE = re.compile(r'^(condmoe_(?:data_wait_seconds|train_step_duration_seconds)_(?:sum|count))\{[^}]*\}\s+(\S+)$')


def _vmhwm_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _vmrss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _shards(path: Path, images: int, classes: int) -> Path:
    from condmoe.datasets import write_shards

    if (path / "manifest.parquet").is_file():
        return path
    # ImageNet-like geometry: shorter sides 256-480 px, aspect 0.6-1.7
    return write_shards(f"photolike:n={images},classes={classes},min_side=256,max_side=480", path,
                        samples_per_shard=256)


def _job(args, shards: Path, storage: Path, *, experts: int, workers: int, name: str, port: int) -> Path:
    tree = yaml.safe_load((CONFIGS / "condconv_efficientnet_b0.yaml").read_text())
    tree["model"].update(experts=experts, num_classes=args.classes)
    tree["data"].update(path=str(shards), batch_size=args.batch * workers, resolution=args.resolution,
                        num_workers=args.loader_workers, eval_batch_size=args.batch)
    tree["optim"].update(steps=args.steps, warmup_steps=2)
    tree["checkpoint"] = {"every": 0, "keep_last": 1}
    tree["metrics"] = {"log_every": args.log_every, "eval_every": 0, "eval_batches": 1,
                       "prometheus": {"port": port, "every_n_steps": 1}}
    tree["cluster"].update(workers=workers, cpus_per_worker=1, threads_per_worker=args.threads,
                           storage_path=str(storage), name=name, max_failures=0)
    p = storage / f"{name}.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


class _Watch(threading.Thread):
    """Scrapes the job's exporter and the VmHWM of its RayTrainWorker processes while it runs."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.url = pid, f"http://127.0.0.1:{port}/metrics"
        self.scrapes: list[dict[str, float]] = []
        self.hwm: dict[int, float] = {}  # pid -> VmHWM of each RayTrainWorker process
        self.parent: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
                sample = {m.group(1): float(m.group(2)) for m in map(_SAMPLE.match, text.splitlines()) if m}
                if sample and (not self.scrapes or sample != self.scrapes[-1]):
                    self.scrapes.append(sample)
            except OSError:
                pass
            try:
                for proc in psutil.Process(self.pid).children(recursive=True):
                    try:
                        if "RayTrainWorker" in " ".join(proc.cmdline()):
                            self.hwm[proc.pid] = max(self.hwm.get(proc.pid, 0.0), _vmhwm_mb(proc.pid))
                            self.parent[proc.pid] = proc.ppid()
                    except (psutil.Error, OSError):
                        pass
            except psutil.Error:
                pass
            self.done.wait(0.5)

    def workers_mb(self) -> list[float]:
        """VmHWM of the training workers (their loader processes, forked with the same title, left out)."""
        return sorted(m for pid, m in self.hwm.items() if self.parent.get(pid) not in self.hwm)


def _wait_share(scrapes: list[dict[str, float]], warm_steps: int) -> float:
    """Mean data wait per micro-batch / mean step time, between the first scrape at or after
    ``warm_steps`` steps and the last one (rank 0's steps; every rank's waits)."""
    key = "condmoe_train_step_duration_seconds_count"
    good = [s for s in scrapes if key in s and "condmoe_data_wait_seconds_count" in s]
    if not good:
        return float("nan")
    first = next((s for s in good if s[key] >= warm_steps), good[0])
    last = good[-1]
    if last[key] <= first[key]:
        first = {k: 0.0 for k in last}
    d = {k: last[k] - first.get(k, 0.0) for k in last}
    wait = d["condmoe_data_wait_seconds_sum"] / max(d["condmoe_data_wait_seconds_count"], 1)
    step = d["condmoe_train_step_duration_seconds_sum"] / max(d[key], 1)
    return wait / step


def condmoe_job(args, job: Path, storage: Path, name: str, port: int) -> dict:
    """``condmoe train`` as a command; images/s, data-wait share, workers' VmHWM."""
    from condmoe.trainer.records import read_jsonl

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "condmoe"), "train", str(job), "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = _Watch(proc.pid, port)
    watch.start()
    out, err = proc.communicate(timeout=3600)
    watch.done.set()
    watch.join()
    if proc.returncode != 0:
        raise RuntimeError(f"condmoe train failed:\n{out[-3000:]}\n{err[-3000:]}")
    recs = read_jsonl(storage / name / "metrics.jsonl", "step")
    rates = [r["samples_per_s"] for r in recs[1:]]
    return {"images_per_s": statistics.median(rates) if rates else float("nan"), "intervals": rates,
            "data_wait_share": _wait_share(watch.scrapes, args.log_every), "scrapes": len(watch.scrapes),
            "worker_vmhwm_mb": watch.workers_mb(), "total_s": time.time() - start}


def memory_probe(job: str, resolution: int, shards: Path, classes: int, batch: int) -> dict:
    """In this (fresh) process: condmoe's train loop on a world of one for two steps at ``batch``."""
    import torch

    from condmoe.trainer.config import load_job
    from condmoe.trainer.loop import train
    from condmoe.trainer.records import StepRecord

    torch.set_num_threads(1)
    base = _vmrss_mb()
    marks: dict[str, float] = {}

    class Mark:  # VmHWM after the training steps, before evaluation and the checkpoint
        def write(self, record) -> None:
            if isinstance(record, StepRecord):
                marks["train"] = _vmhwm_mb()
                marks["step_s"] = record.step_seconds[-1] if record.step_seconds else float("nan")

        def close(self) -> None:
            pass

    with tempfile.TemporaryDirectory(prefix="condmoe-mem-") as tmp:
        over = [f"data.path={shards}", f"data.resolution={resolution}", f"data.batch_size={batch}",
                "data.eval_batch_size=8", "data.num_workers=0", f"model.num_classes={classes}",
                "optim.steps=2", "optim.warmup_steps=1", "checkpoint.every=0", "metrics.log_every=1",
                "metrics.eval_every=0", "metrics.eval_batches=1", "cluster.workers=1",
                f"cluster.storage_path={tmp}"]
        if job == "coe_mobilenet":
            over.append("model.ep_size=1")
        cfg = load_job(CONFIGS / f"{job}.yaml", over)
        train(cfg, sinks=[Mark()])
        ckpt_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
    return {"job": job, "model": f"{cfg.model.name}/{cfg.model.size} E={cfg.model.experts}",
            "resolution": resolution, "batch": batch, "base_mb": base, "train_vmhwm_mb": marks.get("train"),
            "run_vmhwm_mb": _vmhwm_mb(), "step_s": marks.get("step_s"), "checkpoint_mb": ckpt_mb}


def memory_process(job: str, resolution: int, shards: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-only", job, "--shards", str(shards), "--classes", str(args.classes),
           "--resolution", str(resolution), "--memory-batch", str(args.memory_batch)]
    p = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"memory probe of {job} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8, help="per-worker batch of the throughput runs")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--loader-workers", type=int, default=1, help="data.num_workers (the job's: 1)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=640, help="photo-like JPEGs to generate")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--memory-batch", type=int, default=32)
    ap.add_argument("--parts", nargs="+", default=["throughput", "memory"], choices=["throughput", "memory"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts of the throughput part")
    ap.add_argument("--jobs", nargs="+", default=list(MEMORY_JOBS), choices=list(MEMORY_JOBS),
                    help="configs/ jobs of the memory part")
    ap.add_argument("--shards", type=Path, default=None, help="photo shard dir (default: generated in a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "imagenet_train.json")
    ap.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.memory_only:
        print(json.dumps(memory_probe(args.memory_only, args.resolution, args.shards, args.classes,
                                      args.memory_batch)))
        return
    from condmoe.trainer.engine import free_port

    result: dict = {"config": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="condmoe-bench-") as tmp:
        storage = Path(tmp)
        t = time.perf_counter()
        shards = _shards(args.shards or storage / "shards", args.images, args.classes)
        result["shards_s"] = time.perf_counter() - t
        if "throughput" in args.parts:
            variants = [(e, w) for w in args.workers for e in (8, 1)]
            runs: dict[str, list[dict]] = {f"e{e}_w{w}": [] for e, w in variants}
            for r in range(args.rounds):
                for e, w in variants:
                    name, port = f"e{e}-w{w}-r{r}", free_port()
                    job = _job(args, shards, storage, experts=e, workers=w, name=name, port=port)
                    runs[f"e{e}_w{w}"].append(condmoe_job(args, job, storage, name, port))
                    last = runs[f"e{e}_w{w}"][-1]
                    print(f"round {r + 1}/{args.rounds}: experts {e}, {w} worker(s): {last['images_per_s']:.2f} "
                          f"images/s, data wait {100 * last['data_wait_share']:.1f}% of the step, workers' VmHWM "
                          f"{', '.join(f'{m:.0f}' for m in last['worker_vmhwm_mb'])} MB", flush=True)
            result["throughput"] = runs
            result["paired_step_time_ratio"] = {
                w: [b["images_per_s"] / a["images_per_s"] for a, b in zip(runs[f"e8_w{w}"], runs[f"e1_w{w}"])]
                for w in args.workers}
        if "memory" in args.parts:
            result["memory"] = []
            for job in args.jobs:
                res = MEMORY_JOBS[job]
                result["memory"].append(memory_process(job, res, shards, args))
                m = result["memory"][-1]
                print(f"memory {job}: train VmHWM {m['train_vmhwm_mb']:.0f} MB, run {m['run_vmhwm_mb']:.0f} MB",
                      flush=True)
    result["load_after"] = os.getloadavg()

    print(f"\nCondConv-EfficientNet-B0 on photo-like JPEGs at {args.resolution}x{args.resolution}, batch "
          f"{args.batch}/worker, {args.threads} torch thread(s)/worker, data.num_workers {args.loader_workers}, "
          f"{args.steps} steps, {args.rounds} rounds, {os.cpu_count()} CPUs, load average "
          f"{result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}")
    if "throughput" in result:
        runs = result["throughput"]
        print(f"{'variant':<28} {'images/s':>9} {'s/step':>7} {'data wait':>10} {'worker VmHWM MB':>16}")
        for w in args.workers:
            for e in (8, 1):
                rs = runs[f"e{e}_w{w}"]
                rate = statistics.median(r["images_per_s"] for r in rs)
                wait = statistics.median(r["data_wait_share"] for r in rs)
                hwm = max((m for r in rs for m in r["worker_vmhwm_mb"]), default=float("nan"))
                label = f"{'CondConv B0, 8 experts' if e == 8 else 'static B0 (experts=1)'}, {w}w"
                print(f"{label:<28} {rate:>9.2f} {args.batch * w / rate:>7.2f} {100 * wait:>9.1f}% {hwm:>16.0f}")
        for w, v in result["paired_step_time_ratio"].items():
            print(f"time per step, 8 experts / static, {w} worker(s), paired by round: median "
                  f"{statistics.median(v):.3f}x (rounds: {', '.join(f'{x:.3f}' for x in v)}; target <= 1.15x)")
    if "memory" in result:
        print(f"\npeak memory per worker (VmHWM, one process, world of one), batch {args.memory_batch}")
        print(f"{'job':<26} {'model':<36} {'res':>4} {'base MB':>8} {'train MB':>9} {'run MB':>7} "
              f"{'s/step':>7} {'ckpt MB':>8}")
        for m in result["memory"]:
            print(f"{m['job']:<26} {m['model']:<36} {m['resolution']:>4} {m['base_mb']:>8.0f} "
                  f"{m['train_vmhwm_mb']:>9.0f} {m['run_vmhwm_mb']:>7.0f} {m['step_s']:>7.2f} "
                  f"{m['checkpoint_mb']:>8.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
