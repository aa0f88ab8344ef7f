"""Shared fixtures: small slices of real data (Fashion-MNIST, digits fallback)."""

from __future__ import annotations

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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped where torch sees no GPU, so the CPU suite stays green."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
