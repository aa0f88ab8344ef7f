"""Fixtures for the monitoring tests: real Fashion-MNIST shards, embedded Ray, a real Prometheus server.

Everything started here is stopped in ``finally``; Prometheus listens on 127.0.0.1 only and
scrapes only 127.0.0.1 targets.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from prom_server import PrometheusServer

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """~690 train / 768 test real Fashion-MNIST samples as WebDataset shards."""
    from condmoe.datasets import write_shards

    out = tmp_path_factory.mktemp("shards") / "fashion_mnist"
    return write_shards("fashion_mnist", out, samples_per_shard=128, limit=768)


@pytest.fixture(scope="module")
def ray_local():
    """An embedded Ray for the module (2 workers + the Train controller); shut down afterwards."""
    import ray

    os.environ["DS_ACCELERATOR"] = "cpu"
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def prometheus(tmp_path):
    """start(targets) -> a running PrometheusServer scraping ``targets`` (host:port) every 0.5 s."""
    if not Path(PROMETHEUS).is_file():
        pytest.fail(f"{PROMETHEUS} not found: `make setup` installs the Debian package prometheus")
    servers: list[PrometheusServer] = []

    def start(targets: list[str], interval: str = "500ms") -> PrometheusServer:
        server = PrometheusServer(PROMETHEUS, tmp_path / f"prom{len(servers)}", targets, free_port(), interval)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for s in servers:
            s.stop()
