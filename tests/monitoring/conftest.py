"""Fixtures for the monitoring tests: real Fashion-MNIST shards, real jobs, a real Prometheus server.

Shared once per session by the test files:
- ``soft_updates``: routing stats of a real CondConv network on Fashion-MNIST batches (soft routing);
- ``scraped_job``: a 2-worker topk_moe job on embedded Ray (hard routing, the exporter actor);
- ``local_job``: a one-process coe_cnn job without Ray (hard routing with early exits, rank 0's
  own exporter); ``soft_local_job``: the same with condconv_cnn (soft routing).
Each is scraped by its own Prometheus. Everything started here is stopped in ``finally``;
Prometheus listens on 127.0.0.1 only and scrapes only 127.0.0.1 targets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prom_server import JOB_STEPS, LOCAL_STEPS, ROOT, PrometheusServer, free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _prometheus(workdir: Path, port: int, interval: str) -> PrometheusServer:
    if not Path(PROMETHEUS).is_file():
        pytest.fail(f"{PROMETHEUS} not found: `make setup` installs the Debian package prometheus")
    return PrometheusServer(PROMETHEUS, workdir, [f"127.0.0.1:{port}"], free_port(), interval)


@pytest.fixture
def prometheus(tmp_path):
    """start(targets) -> a running PrometheusServer scraping ``targets`` (127.0.0.1:port); stopped after."""
    servers: list[PrometheusServer] = []

    def start(targets: list[str], interval: str = "500ms") -> PrometheusServer:
        if not Path(PROMETHEUS).is_file():
            pytest.fail(f"{PROMETHEUS} not found: `make setup` installs the Debian package prometheus")
        server = PrometheusServer(PROMETHEUS, tmp_path / f"prom{len(servers)}", targets, free_port(), interval)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="session")
def soft_updates():
    """Three updates of condconv_cnn/tiny (8 experts) routing stats over real Fashion-MNIST batches."""
    import torch

    from condmoe.datasets.idx import load_default_images
    from condmoe.routing import accumulate_stats, build_model, collect_routing_stats

    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels, _ = load_default_images("train", limit=192)
    x = torch.from_numpy(images.copy()).float().div(255).sub(0.286).div(0.353).unsqueeze(1)
    y = torch.from_numpy(labels)
    model = build_model("condconv_cnn", "tiny", experts=8)
    updates, totals = [], {}
    with torch.no_grad():
        for i in range(3):
            model(x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64])
            stats = collect_routing_stats(model)
            totals = accumulate_stats(totals, stats)
            updates.append({"step": i + 1, "steps": 1, "samples": 64, "loss": 2.0 - 0.1 * i,
                            "routing": stats,
                            "step_seconds": [0.05], "data_wait_seconds": [0.001, 0.002]})
    return updates, totals, stats


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """~690 train / 768 test real Fashion-MNIST samples as WebDataset shards."""
    from condmoe.datasets import write_shards

    out = tmp_path_factory.mktemp("shards") / "fashion_mnist"
    return write_shards("fashion_mnist", out, samples_per_shard=128, limit=768)


@pytest.fixture(scope="session")
def scraped_job(fmnist_shards, tmp_path_factory):
    """topk_moe (hard routing, ep_size 2) on 2 Ray workers while Prometheus scrapes the exporter actor."""
    import ray

    from condmoe.cluster.launch import launch
    from condmoe.cluster.exporter_hosts import start_job_exporter
    from condmoe.trainer.config import load_job

    tmp = tmp_path_factory.mktemp("job")
    cfg = load_job(ROOT / "configs/topk_moe.yaml", [
        f"data.path={fmnist_shards}", "model.size=tiny", f"optim.steps={JOB_STEPS}", "optim.warmup_steps=0",
        "optim.schedule=constant", "data.batch_size=32", "data.eval_batch_size=128", "checkpoint.every=4",
        "metrics.log_every=1", "metrics.eval_batches=1", f"cluster.storage_path={tmp}",
        "cluster.workers=2", "cluster.name=promjob", "metrics.prometheus.port=0"])
    os.environ["DS_ACCELERATOR"] = "cpu"
    # address="local": always a fresh instance, never another test's (or anyone's) cluster on this host
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    prom = exporter = None
    try:
        exporter = start_job_exporter(cfg)  # launch() finds and reuses it, so it outlives the run here
        assert exporter.actor is not None, "the exporter actor did not start"
        port = int(exporter.url.rsplit(":", 1)[1].split("/")[0])
        prom = _prometheus(tmp / "prom", port, "500ms")
        prom.start()
        t0 = time.monotonic()
        res = launch(cfg)
        seconds = time.monotonic() - t0
        assert res.error is None, res.error
        # the final update reached the exporter before launch returned; wait until Prometheus saw it
        job = f'{{job="{cfg.run_name}"}}'
        prom.wait_for(f"condmoe_train_last_step{job}", lambda r: r and float(r[0]["value"][1]) == JOB_STEPS)
        queries = {name: prom.query(q) for name, q in [
            ("assignments", f"condmoe_expert_assignments_total{job}"),
            ("samples", f"condmoe_layer_routed_samples_total{job}"),
            ("dropped", f"condmoe_layer_dropped_total{job}"),
            ("steps", f"condmoe_train_steps_total{job}"),
            ("train_samples", f"condmoe_train_samples_total{job}"),
            ("step_count", f"condmoe_train_step_duration_seconds_count{job}"),
            ("wait_count", f"condmoe_data_wait_seconds_count{job}"),
            ("ckpt_count", f"condmoe_checkpoint_duration_seconds_count{job}"),
            ("restarts", f"condmoe_worker_restarts_total{job}"),
            ("up", 'up{job="condmoe"}')]}
        exposition = ray.get(exporter.actor.exposition.remote(), timeout=30)
        yield {"cfg": cfg, "res": res, "q": queries, "exposition": exposition, "seconds": seconds,
               "url": exporter.url}
    finally:
        if prom is not None:
            prom.stop()
        if exporter is not None:
            exporter.stop(final_scrape_timeout_s=0)
        ray.shutdown()


def _run_local_job(tmp: Path, config: str, name: str, shards: Path, extra: list[str],
                   queries: dict[str, str]) -> dict:
    """Run _local_job.py (one process, no Ray) while a Prometheus scrapes its exporter; query afterwards."""
    port = free_port()
    prom = _prometheus(tmp / "prom", port, "250ms")
    try:
        prom.start()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("_local_job.py")), str(ROOT / "configs" / config),
             str(tmp), f"data.path={shards}", "model.size=tiny", f"optim.steps={LOCAL_STEPS}",
             "optim.warmup_steps=0", "optim.schedule=constant", "data.batch_size=32", "data.eval_batch_size=128",
             "metrics.log_every=2", "metrics.prometheus.every_n_steps=3", "metrics.eval_batches=1",
             "checkpoint.every=0", "checkpoint.portable=false", f"cluster.storage_path={tmp / 'runs'}",
             f"cluster.name={name}", f"metrics.prometheus.port={port}", *extra],
            capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((tmp / "result.json").read_text())
        # the process is gone, so its series are stale now: read the last scraped values
        q = {key: prom.query(f'last_over_time({metric}{{job="{name}"}}[5m])') for key, metric in queries.items()}
        return {"result": result, "q": q, "exposition": (tmp / "exposition.txt").read_text(),
                "log": proc.stderr, "run_dir": tmp / "runs" / name}
    finally:
        prom.stop()


@pytest.fixture(scope="session")
def local_job(fmnist_shards, tmp_path_factory):
    """coe_cnn (hard routing, early exits) for a few steps in one process without Ray, shards missing."""
    tmp = tmp_path_factory.mktemp("local")
    shards = tmp / "shards"
    shutil.copytree(fmnist_shards, shards)
    for tar in sorted(shards.glob("train-*.tar"))[1:]:  # counted as missing_shard, skipped, batches topped up
        tar.unlink()
    return _run_local_job(tmp, "coe.yaml", "localjob", shards, ["model.ep_size=1"], {
        "assignments": "condmoe_expert_assignments_total", "exits": "condmoe_layer_early_exits_total",
        "bad": "condmoe_bad_samples_skipped_total", "steps": "condmoe_train_steps_total"})


@pytest.fixture(scope="session")
def soft_local_job(fmnist_shards, tmp_path_factory):
    """condconv_cnn (soft routing) for a few steps in one process without Ray."""
    return _run_local_job(tmp_path_factory.mktemp("soft"), "condconv.yaml", "softlocal", fmnist_shards, [], {
        "weights": "condmoe_expert_routing_weight_total", "mean": "condmoe_expert_routing_weight_mean",
        "samples": "condmoe_layer_routed_samples_total"})
