"""Checkpoints and shards on a local S3 server vs local disk (CPU, one process).

- checkpoint save and load MB/s: ``CheckpointManager`` as the train loop calls it (DeepSpeed's
  sharded files + the portable state, ZeRO 2 kept on one worker) with a local root vs an
  ``s3://`` root (staged locally, uploaded, meta.json last; load = download + load), for the
  demo model (configs/condconv.yaml, ``condmoe demo``'s job) and the largest model of configs/
  (by parameter count at the size its job file names);
- shard streaming samples/s: one pass of ``StreamingLoader`` over the train split (read +
  decode + normalise) from local shards vs the same shards on S3, 0 and 2 loader workers.

The S3 server is moto's (``moto[server]``, the dev extra) on a free 127.0.0.1 port, started
here as a subprocess and stopped at the end; it runs in Python on the same cores, so its
numbers are a floor for a real object store, not a forecast. Prints a table and writes
benchmarks/results/storage.json.

    python benchmarks/storage.py [--limit 4000 --repeats 3 --models condconv,cigt]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO = "condconv"
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    from condmoe.trainer.engine import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    raise RuntimeError("moto server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def largest_config() -> tuple[str, int]:
    """The job of configs/ whose model has the most parameters (built at its own size)."""
    from condmoe.routing import build_model
    from condmoe.trainer.config import load_job

    counts = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_job(path, ["model.ep_size=1", "data.path=/tmp"])
        model = build_model(cfg.model.name, cfg.model.size, **cfg.model.build_kwargs())
        counts[path.stem] = sum(p.numel() for p in model.parameters())
    name = max(counts, key=counts.get)
    return name, counts[name]


def _size(root) -> float:
    """MB of one checkpoint (local Path or s3:// URL)."""
    import pyarrow.fs as pafs

    from condmoe.datasets.urls import filesystem

    fs, path = filesystem(str(root))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File) / 1e6


def checkpoint_io(job: str, roots: dict[str, str], shards: Path, repeats: int) -> dict:
    """Save / load seconds and MB/s of one checkpoint of ``job`` to each root."""
    import torch

    from condmoe.trainer.checkpoint import CheckpointManager
    from condmoe.trainer.config import load_job
    from condmoe.trainer.engine import build_engine, setup_distributed

    cfg = load_job(CONFIGS / f"{job}.yaml", [f"data.path={shards}", "model.ep_size=1",
                                             "deepspeed.zero_on_one_worker=true", "cluster.workers=1"])
    setup_distributed(cfg)
    engine = build_engine(cfg, 1)
    res = cfg.data.resolution or 28  # the photo-path jobs' input size, else Fashion-MNIST's
    x = torch.randn(4, cfg.model.in_channels, res, res)
    out = engine(x, torch.randint(0, cfg.model.num_classes, (4,)))
    engine.backward(out.loss)
    engine.step()  # optimiser state exists: the checkpoint holds it
    params = sum(p.numel() for p in engine.module.parameters())
    rows = {}
    for where, root in roots.items():
        mgr = CheckpointManager(f"{root}/{job}", keep_last=2)
        saves, loads = [], []
        for i in range(repeats):
            t = time.perf_counter()
            ck = mgr.save(engine, i + 1, {"ep_size": 1})
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            mgr.load(engine, ck, world_size=1, ep_size=1)
            loads.append(time.perf_counter() - t)
        mb = _size(ck)
        rows[where] = {"params": params, "checkpoint_mb": round(mb, 2),
                       "save_s": round(statistics.median(saves), 3), "load_s": round(statistics.median(loads), 3),
                       "save_mb_per_s": round(mb / statistics.median(saves), 1),
                       "load_mb_per_s": round(mb / statistics.median(loads), 1)}
    return rows


def streaming(sources: dict[str, str], repeats: int, batch: int) -> dict:
    """samples/s of one pass over the train split from each source, 0 and 2 loader workers."""
    from condmoe.datasets import StreamingLoader

    rows = {}
    for workers in (0, 2):
        for where, src in sources.items():
            rates = []
            for _ in range(repeats):
                loader = StreamingLoader(src, "train", batch, seed=0, num_workers=workers)
                t, n = time.perf_counter(), 0
                for b in loader:
                    n += len(b)
                rates.append(n / (time.perf_counter() - t))
            rows[f"{where} ({workers} workers)"] = {"samples": n, "samples_per_s": round(statistics.median(rates))}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=4000, help="Fashion-MNIST samples per split to shard")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=None, help="comma-separated configs/ jobs (default: the demo's and "
                                                   "the largest)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "storage.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="condmoe-bench-storage-") as tmp:
        tmp = Path(tmp)
        proc, endpoint = start_moto(tmp / "moto.log")
        try:
            # this process is the S3 client: the AWS variables of a local server (no real credentials)
            os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                               "AWS_EC2_METADATA_DISABLED": "true", "CONDMOE_STAGE_DIR": str(tmp / "stage")})
            import pyarrow.fs as pafs

            from condmoe.datasets import write_shards

            pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1",
                              allow_bucket_creation=True).create_dir("bench")
            local_shards = write_shards("fashion_mnist", tmp / "shards", samples_per_shard=args.samples_per_shard,
                                        limit=args.limit)
            s3_shards = write_shards("fashion_mnist", "s3://bench/shards", samples_per_shard=args.samples_per_shard,
                                     limit=args.limit)
            if args.models:
                models = args.models.split(",")
            else:
                big, n = largest_config()
                print(f"largest model of configs/: {big} ({n / 1e6:.2f}M parameters)", flush=True)
                models = list(dict.fromkeys([DEMO, big]))
            roots = {"local disk": str(tmp / "ckpt"), "S3 (moto)": "s3://bench/ckpt"}
            ckpt = {m: checkpoint_io(m, roots, local_shards, args.repeats) for m in models}
            stream = streaming({"local disk": str(local_shards), "S3 (moto)": s3_shards}, args.repeats, args.batch)
        finally:
            stop(proc)

    width = max(len(f"{m}, S3 (moto)") for m in ckpt) + 2
    print(f"\n{'checkpoint':<{width}}{'params':>10}{'MB':>8}{'save s':>9}{'save MB/s':>11}{'load s':>9}{'load MB/s':>11}")
    for model, rows in ckpt.items():
        for where, r in rows.items():
            print(f"{model + ', ' + where:<{width}}{r['params'] / 1e6:>9.2f}M{r['checkpoint_mb']:>8.1f}{r['save_s']:>9.2f}"
                  f"{r['save_mb_per_s']:>11.1f}{r['load_s']:>9.2f}{r['load_mb_per_s']:>11.1f}")
    print(f"\n{'shard streaming (train split)':<34}{'samples':>9}{'samples/s':>11}")
    for where, r in stream.items():
        print(f"{where:<34}{r['samples']:>9}{r['samples_per_s']:>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": ckpt, "streaming": stream, "limit": args.limit,
                                    "samples_per_shard": args.samples_per_shard, "batch": args.batch,
                                    "repeats": args.repeats, "server": "moto (Python, same host)"}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
