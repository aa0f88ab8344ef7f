"""Fixtures for trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def job_file(tmp_path):
    """Write a job dict to ``tmp_path/NAME.yaml`` (storage under tmp_path/runs); returns the path."""

    def make(tree: dict, name: str = "job") -> Path:
        tree = json.loads(json.dumps(tree))
        tree.setdefault("cluster", {}).setdefault("storage_path", str(tmp_path / "runs"))
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(tree))
        return p

    return make


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """~690 train / 768 test real Fashion-MNIST samples as WebDataset shards."""
    from condmoe.datasets import write_shards

    out = tmp_path_factory.mktemp("shards") / "fashion_mnist"
    return write_shards("fashion_mnist", out, samples_per_shard=128, limit=768)
