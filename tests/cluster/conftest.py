"""Fixtures for cluster tests: a Fashion-MNIST shard slice and an embedded Ray, always shut down."""

from __future__ import annotations

import os

import pytest


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
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    try:
        yield ray
    finally:
        ray.shutdown()
