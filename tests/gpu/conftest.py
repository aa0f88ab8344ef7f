"""Fixtures for the GPU tests (marker ``gpu``: tests/conftest.py skips them where CUDA is absent)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """~690 train / 768 test real Fashion-MNIST samples as WebDataset shards."""
    from condmoe.datasets import write_shards

    out = tmp_path_factory.mktemp("shards") / "fashion_mnist"
    return write_shards("fashion_mnist", out, samples_per_shard=128, limit=768)
