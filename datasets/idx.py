"""Raw image-classification sources: Fashion-MNIST idx files and scikit-learn digits.

Fashion-MNIST: Xiao, Rasul, Vollgraf, arXiv 1708.07747 (MIT licence), read from the
four standard idx .gz files (Debian package ``dataset-fashion-mnist`` installs them
under /usr/share/datasets/fashion-mnist). Nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: idx dtype 0x{dtype_code:02x} unsupported (only uint8)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {body.size}")
    return body.reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | Path = FASHION_MNIST_DIR, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) of a Fashion-MNIST split."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_name, lbl_name = _FILES[split]
    for name in (img_name, lbl_name):
        if not (root / name).exists():
            raise FileNotFoundError(
                f"Fashion-MNIST file {root / name} not found (install the Debian package "
                "dataset-fashion-mnist or pass the folder holding the four .gz files)"
            )
    images = read_idx(root / img_name)
    labels = read_idx(root / lbl_name).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def load_digits_images(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as (images uint8 (N, 8, 8) scaled 0..255, labels int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = d.target.astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def fashion_mnist_available(root: str | Path = FASHION_MNIST_DIR) -> bool:
    return all((Path(root) / f).exists() for pair in _FILES.values() for f in pair)


def load_default_images(split: str = "train", limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Fashion-MNIST when installed, else scikit-learn digits (logged). Returns (images, labels, name)."""
    if fashion_mnist_available():
        images, labels = load_fashion_mnist(split, limit=limit)
        return images, labels, "fashion_mnist"
    log.warning("Fashion-MNIST not found under %s: falling back to scikit-learn digits", FASHION_MNIST_DIR)
    images, labels = load_digits_images()
    cut = int(len(images) * 0.8)
    images, labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels, "digits"
