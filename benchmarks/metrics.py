"""Training throughput with the Prometheus exporter under 50 scrapes/s, against no scraping (CPU).

A ``condconv_cnn`` ``small`` (CondConv, arXiv 1904.04971, 8 experts) trains on real
Fashion-MNIST batches held in memory, and every step feeds its routing stats to the
job's exporter. Two shapes: the exporter in its own process (what condmoe runs: the
Ray actor on the head node, or rank 0's child process without Ray; here
ExporterProcess, fed over a socket) and, for reference, inside the training process.

For each shape, ``--seconds`` of training under ``--rate`` scrapes/s (a separate
scraper process making plain HTTP GETs, as Prometheus would) and ``--seconds`` without scraping, in
alternating blocks of ``--block`` seconds so that the load of other programs on a
shared machine falls on both alike. One run; prints a table and writes JSON to
benchmarks/results/metrics.json.

    python benchmarks/metrics.py [--seconds 10] [--rate 50] [--block 1] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from condmoe.cluster.exporter_hosts import ExporterProcess
from condmoe.cluster.metrics import MetricsExporter
from condmoe.datasets.idx import load_default_images
from condmoe.routing import build_model, collect_routing_stats

RESULTS = Path(__file__).resolve().parent / "results"


def _get(host: str, port: int, path: str) -> int:
    """One plain HTTP/1.0 GET over a fresh connection (as cheap as a load generator gets); body bytes."""
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") and not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"scrape failed: {head[:40]!r}")
    return len(body)


def scraper(url: str, rate: float, on, stop, out) -> None:
    """GET ``url`` ``rate`` times a second while ``on`` is set, until ``stop``; reports (scrapes, failures, bytes, CPU s)."""
    parsed = urlparse(url)
    n = failed = size = 0
    cpu0 = time.process_time()  # after this process' imports
    while not stop.is_set():
        if not on.wait(timeout=0.05):
            continue
        start, k = time.perf_counter(), 0
        while on.is_set() and not stop.is_set():
            try:
                size = _get(parsed.hostname, parsed.port, parsed.path)
                n += 1
            except OSError:
                failed += 1
            k += 1
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    out.put((n, failed, size, time.process_time() - cpu0))


class Trainer:
    """condconv_cnn small on in-memory batches; each step feeds the exporter."""

    def __init__(self, batch: int, samples: int) -> None:
        images, labels, self.source = load_default_images("train", limit=samples)
        self.x = torch.from_numpy(images.copy()).float().div(255).sub(0.286).div(0.353).unsqueeze(1)
        self.y = torch.from_numpy(labels)
        self.model = build_model("condconv_cnn", "small", experts=8, num_classes=10, in_channels=1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.batch, self.step = batch, 0

    def run(self, seconds: float, exporter) -> int:
        """Train for ``seconds``; returns the steps done."""
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            i = (self.step * self.batch) % (len(self.x) - self.batch)
            t0 = time.perf_counter()
            out = self.model(self.x[i:i + self.batch], self.y[i:i + self.batch])
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            self.opt.step()
            stats = collect_routing_stats(self.model)
            self.step += 1
            done += 1
            exporter.update({"step": self.step, "steps": 1, "samples": self.batch, "loss": float(out.loss.detach()),
                             "routing": stats,
                             "step_seconds": [time.perf_counter() - t0], "data_wait_seconds": [0.0]})
        return done


def _cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (Linux /proc), None elsewhere."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(trainer: Trainer, exporter, args) -> dict:
    """Alternate unscraped / scraped blocks; samples/s of each."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads, no copy of the model
    on, stop, q = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=scraper, args=(exporter.url, args.rate, on, stop, q))
    proc.start()
    steps = {False: 0, True: 0}
    secs = {False: 0.0, True: 0.0}
    child = getattr(getattr(exporter, "_proc", None), "pid", None)  # ExporterProcess only
    cpu0 = _cpu_seconds(child) if child else None
    try:
        trainer.run(2.0, exporter)  # warm-up
        blocks = max(1, round(args.seconds / args.block))
        for _ in range(blocks):
            for scraped in (False, True):
                if scraped:
                    on.set()
                    time.sleep(0.05)  # the scraper is running when the block starts
                t0 = time.perf_counter()
                steps[scraped] += trainer.run(args.block, exporter)
                secs[scraped] += time.perf_counter() - t0
                on.clear()
    finally:
        stop.set()
        on.clear()
        n, failed, size, scraper_cpu = q.get(timeout=30)
        proc.join(timeout=10)
    cpu1 = _cpu_seconds(child) if child else None
    wall = secs[False] + secs[True]
    rate = {k: steps[k] * args.batch / secs[k] for k in (False, True)}
    return {"unscraped_samples_per_s": round(rate[False], 1), "scraped_samples_per_s": round(rate[True], 1),
            "unscraped_steps": steps[False], "scraped_steps": steps[True],
            "scraped_seconds": round(secs[True], 2), "scrapes": n, "scrapes_per_s": round(n / secs[True], 1),
            "scrape_failures": failed, "exposition_bytes": size,
            "scraper_cpu_share": round(scraper_cpu / wall, 4),
            "exporter_process_cpu_share": round((cpu1 - cpu0) / wall, 4) if cpu0 is not None and cpu1 else None,
            "ratio": round(rate[True] / rate[False], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds scraped (and as many unscraped)")
    ap.add_argument("--rate", type=float, default=50.0, help="scrapes per second")
    ap.add_argument("--block", type=float, default=1.0, help="seconds per alternating block")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=4096)
    args = ap.parse_args()
    if min(args.seconds, args.rate, args.block) <= 0:
        raise SystemExit(f"--seconds, --rate and --block must be > 0, got {args.seconds}, {args.rate}, {args.block}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trainer = Trainer(args.batch, args.samples)
    rows = []
    for shape, make in (("own process", ExporterProcess), ("training process", MetricsExporter)):
        exporter = make("bench", "127.0.0.1", 0)
        exporter.start()
        try:
            rows.append({"exporter": shape, **measure(trainer, exporter, args)})
        finally:
            exporter.stop()
    print(f"condconv_cnn small, 8 experts, batch {args.batch}, {args.threads} thread(s), {trainer.source}; "
          f"exporter fed every step; {args.seconds:g} s scraped + {args.seconds:g} s not, {args.block:g} s blocks")
    print(f"{'exporter in':<18}{'no scraping':>13}{'scraped':>10}{'scrapes/s':>11}{'failed':>8}{'ratio':>8}"
          f"{'exporter CPU':>14}{'scraper CPU':>13}")
    for r in rows:
        exp_cpu = r["exporter_process_cpu_share"]
        print(f"{r['exporter']:<18}{r['unscraped_samples_per_s']:>13.1f}{r['scraped_samples_per_s']:>10.1f}"
              f"{r['scrapes_per_s']:>11.1f}{r['scrape_failures']:>8}{r['ratio']:>8.3f}"
              f"{(f'{100 * exp_cpu:.1f}%' if exp_cpu is not None else '(in trainer)'):>14}"
              f"{100 * r['scraper_cpu_share']:>12.1f}%")
    print("(samples/s; ratio = scraped / unscraped; CPU = share of one core over the whole measurement)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "metrics.json"
    out.write_text(json.dumps({"model": "condconv_cnn/small/8", "batch": args.batch, "threads": args.threads,
                               "seconds": args.seconds, "block": args.block, "rate": args.rate,
                               "source": trainer.source, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
