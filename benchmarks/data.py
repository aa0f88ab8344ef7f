"""Shard write rate, StreamingLoader throughput and the data wait of a real CondConv training loop (CPU).

Fashion-MNIST (Xiao et al., arXiv 1708.07747) is written as shards; the reader decodes
them to normalised tensors in batches of 128 with 0, 1 and 2 loader workers; beside it
the training throughput of ``condconv_cnn`` ``small`` (CondConv, arXiv 1904.04971,
8 experts) on the same machine, and the share of step time a loader-fed training loop
spends waiting for data. All numbers come from one run. Prints a table and writes
JSON to benchmarks/results/data.json.

    python benchmarks/data.py [--limit N] [--train-steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from condmoe.datasets import StreamingLoader, read_manifest, write_shards
from condmoe.routing import build_model


def bench_write(out: Path, limit: int | None, samples_per_shard: int) -> dict:
    start = time.perf_counter()
    write_shards("fashion_mnist", out, samples_per_shard=samples_per_shard, limit=limit, overwrite=True)
    secs = time.perf_counter() - start
    man = read_manifest(out)
    n = sum(r.samples for r in man.shards)
    mb = sum(r.bytes for r in man.shards) / 1e6
    return {"samples": n, "shards": len(man.shards), "MB": round(mb, 1), "seconds": round(secs, 2),
            "samples_per_s": round(n / secs), "MB_per_s": round(mb / secs, 2)}


def bench_reader(folder: Path, workers: int, batch: int, max_batches: int | None) -> dict:
    """One pass (worker start-up included) over the train split; samples/s delivered to the consumer."""
    ld = StreamingLoader(folder, "train", batch, num_workers=workers, seed=0)
    n = 0
    start = time.perf_counter()
    for i, b in enumerate(ld, 1):
        n += len(b)
        if max_batches is not None and i == max_batches:
            break
    secs = time.perf_counter() - start
    return {"workers": workers, "batches": n // batch, "seconds": round(secs, 2), "samples_per_s": round(n / secs)}


def _model() -> torch.nn.Module:
    return build_model("condconv_cnn", "small", experts=8, num_classes=10, in_channels=1)


def bench_train(folder: Path, batch: int, steps: int) -> dict:
    """Forward + backward + SGD step of condconv_cnn small on real batches already in memory."""
    torch.manual_seed(0)
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = []
    for b in StreamingLoader(folder, "train", batch, seed=1):
        batches.append((b.images, b.labels))
        if len(batches) == 4:
            break

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        model(x, y).loss.backward()
        opt.step()

    for i in range(3):  # warm-up
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    secs = time.perf_counter() - start
    return {"steps": steps, "seconds": round(secs, 2), "samples_per_s": round(steps * batch / secs),
            "ms_per_step": round(1000 * secs / steps, 1)}


def bench_fed_loop(folder: Path, batch: int, steps: int, workers: int) -> dict:
    """The same training step fed by the StreamingLoader: time waiting for the next batch vs the step."""
    torch.manual_seed(0)
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ld = StreamingLoader(folder, "train", batch, num_workers=workers, seed=2)
    it = iter(ld)
    next(it)  # worker start-up is a once-per-epoch cost, reported by the reader rows
    waits, compute = [], 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        x = next(it)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x.images, x.labels).loss.backward()
        opt.step()
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        compute += t2 - t1
    wait = sum(waits)
    return {"workers": workers, "steps": steps, "wait_s": round(wait, 3), "compute_s": round(compute, 2),
            "wait_fraction": round(wait / (wait + compute), 4),
            "wait_ms_median": round(1000 * statistics.median(waits), 2), "wait_ms_max": round(1000 * max(waits), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="Fashion-MNIST samples per source split (default all)")
    ap.add_argument("--samples-per-shard", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reader-batches", type=int, default=None, help="cap per reader run (default: one epoch)")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="condmoe-bench-"))
    try:
        shards = tmp / "fmnist"
        write = bench_write(shards, args.limit, args.samples_per_shard)
        readers = [bench_reader(shards, w, args.batch, args.reader_batches) for w in (0, 1, 2)]
        train = bench_train(shards, args.batch, args.train_steps)
        fed = bench_fed_loop(shards, args.batch, args.train_steps, workers=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one_worker = next(r for r in readers if r["workers"] == 1)["samples_per_s"]
    ratio = one_worker / train["samples_per_s"]
    result = {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "batch": args.batch, "write": write,
              "reader": readers, "train_condconv_small_e8": train, "fed_loop": fed,
              "reader1_over_train": round(ratio, 2)}
    print(f"shard write: {write['samples']} samples, {write['shards']} shards, {write['MB']} MB in "
          f"{write['seconds']} s = {write['samples_per_s']} samples/s ({write['MB_per_s']} MB/s)")
    print(f"{'what':<44}{'samples/s':>12}{'x train':>10}")
    for r in readers:
        print(f"{'reader, ' + str(r['workers']) + ' loader worker(s), batch ' + str(args.batch):<44}"
              f"{r['samples_per_s']:>12}{r['samples_per_s'] / train['samples_per_s']:>10.2f}")
    print(f"{'train condconv_cnn small (8 experts), ' + str(args.threads) + ' thread(s)':<44}"
          f"{train['samples_per_s']:>12}{1.0:>10.2f}")
    print(f"loader-fed training (1 worker): data wait {100 * fed['wait_fraction']:.2f}% of step time "
          f"({fed['wait_s']} s of {fed['wait_s'] + fed['compute_s']:.2f} s over {fed['steps']} steps; "
          f"median wait {fed['wait_ms_median']} ms, max {fed['wait_ms_max']} ms)")
    load = os.getloadavg()[0]
    result["load_average_1min"] = round(load, 2)
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load:.1f} at the end (other jobs share it)")
    print(f"target reader(1 worker) >= 3x train: {ratio:.1f}x -> {'met' if ratio >= 3 else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
