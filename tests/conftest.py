"""Shared fixtures: small slices of real data (Fashion-MNIST, digits fallback)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch

from condmoe.datasets.idx import load_default_images


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images.copy()).float().div_(255.0).sub_(0.2860).div_(0.3530).unsqueeze(1)
    return x, torch.from_numpy(labels)


@pytest.fixture(scope="session")
def fmnist_slice() -> dict[str, torch.Tensor]:
    """2048 training and 512 held-out Fashion-MNIST images as normalised (N, 1, 28, 28) tensors."""
    images, labels, _ = load_default_images("train", limit=2560)
    x, y = _to_tensors(images, labels)
    return {"x_train": x[:2048], "y_train": y[:2048], "x_val": x[2048:], "y_val": y[2048:]}


def pytest_configure(config):
    """Ray's token file (~/.ray/auth_token) is made once, before any test starts Ray: on a fresh machine
    the first embedded Rays of the two pytest-xdist workers would otherwise each write their own token
    there at the same moment, and one cluster's processes could read the other's."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made it already
        return
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".auth_token.{os.getpid()}")
        tmp.write_text(secrets.token_hex(32))  # the form Ray itself generates
        os.replace(tmp, path)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped where torch sees no GPU, so the CPU suite stays green."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
