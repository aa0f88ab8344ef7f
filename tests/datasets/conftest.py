"""Shared shard sets for the datasets tests (written once per session, small)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from condmoe.datasets import write_shards


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn digits: train 1258 (12 shards of 100 + one of 58), val 180, test 359."""
    return write_shards("digits", tmp_path_factory.mktemp("digits") / "shards", samples_per_shard=100, seed=0)


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """The first 600 Fashion-MNIST train and test images: train 540, val 60, test 600, 128 per shard."""
    return write_shards("fashion_mnist", tmp_path_factory.mktemp("fmnist") / "shards", samples_per_shard=128,
                        limit=600, seed=0)


@pytest.fixture
def digits_copy(digits_dir, tmp_path) -> Path:
    """A private copy of the digits shards that a test may damage."""
    return Path(shutil.copytree(digits_dir, tmp_path / "shards"))


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """ImageNet layout of photo-like images: train 4 x 40, val 4 x 10; sides 40-120 px, every 9th a PNG."""
    from condmoe.datasets.photos import make_photo_folder

    return make_photo_folder(tmp_path_factory.mktemp("photos") / "imagenet", classes=4, per_class=40,
                             val_per_class=10, layout="imagenet", min_side=40, max_side=120, png_every=9, seed=3)


@pytest.fixture(scope="session")
def photo_shards(photo_folder, tmp_path_factory) -> Path:
    """``photo_folder`` written with its original bytes: train 160 in 5 shards of 32, val 40 in 2."""
    return write_shards(f"imagefolder:{photo_folder}", tmp_path_factory.mktemp("photo_shards") / "shards",
                        samples_per_shard=32, seed=0)
