"""Image-classification sources that :func:`condmoe.datasets.write_shards` turns into shards.

A source is named by a string:

- ``fashion_mnist`` or ``fashion_mnist:DIR``: Fashion-MNIST (Xiao, Rasul, Vollgraf,
  arXiv 1708.07747) from the four idx .gz files (default
  /usr/share/datasets/fashion-mnist, Debian package ``dataset-fashion-mnist``).
  Its train split gives train + val, its test split gives test.
- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images), split three ways.
- ``imagefolder:PATH``: one subfolder per class (torchvision ImageFolder layout); when
  PATH holds ``train/``, ``val/`` or ``test/`` subfolders those are the splits (ImageNet's
  ``train/<wnid>/*.JPEG`` + ``val/<wnid>/*.JPEG``). Each image keeps its original encoded
  bytes (:class:`Encoded`; see :mod:`condmoe.datasets.photo_sources`) unless ``image_size``
  asks for today's fixed-size decode.
- ``webdataset:DIR_OR_PATTERN``: existing WebDataset shards of other tools (``.jpg``/``.png``
  + ``.cls``), bytes kept; split by shard name or by seeded fractions.
- ``synthetic:n=N,size=S,channels=C,classes=K``: class-conditional images of any
  size and resolution, generated lazily and deterministically (scale tests).
- ``photolike:n=N,classes=K,min_side=A,max_side=B,quality=Q``: generated photo-like JPEGs of
  varying size and aspect ratio, stored as encoded bytes like a photo folder's
  (:func:`condmoe.datasets.photos.photolike_source`): the photo path with no photos at hand.

Every source yields ``(key, image, label)`` per sample: the image is uint8 (H, W) or
(H, W, C), or an :class:`Encoded` image whose bytes go into the shard unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_digits_images, load_fashion_mnist

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")



@dataclass(frozen=True)
class Encoded:
    """An image kept as encoded bytes: ``data`` in format ``ext`` (``jpg``, ``png``, ...), ``width`` x ``height``."""

    data: bytes
    ext: str
    width: int
    height: int


Sample = tuple[str, "np.ndarray | Encoded", int]


@dataclass
class SplitSource:
    """One split of a source: ``n`` samples produced in a fixed order by ``iterate()``."""

    n: int
    iterate: Callable[[], Iterator[Sample]]


@dataclass
class Source:
    """A parsed source: its splits, class names, image geometry and whether h-flips keep labels."""

    name: str
    classes: tuple[str, ...]
    channels: int
    height: int | None  # None: the images keep their own sizes (encoded bytes)
    width: int | None
    splits: dict[str, SplitSource] = field(default_factory=dict)
    hflip: bool = True
    encoded: bool = False  # samples are Encoded (original bytes), not arrays


def _quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``sizes`` (largest remainder; ties to the lower class)."""
    if sizes.sum() == 0:
        return np.zeros_like(sizes)
    exact = sizes * (total / sizes.sum())
    out = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(sizes)), -(exact - out)))
    out[order[: total - out.sum()]] += 1
    return out


def _split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded, class-stratified cut of range(len(labels)) into train/val/test (each part in source order).

    Split sizes are round(n * fraction); each class gives its proportional share.
    """
    labels = np.asarray(labels)
    n = len(labels)
    classes = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in classes], dtype=np.int64)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    q_test = _quotas(sizes, n_test)
    q_val = _quotas(sizes - q_test, n_val)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c, qt, qv in zip(classes, q_test, q_val):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.random.default_rng([seed, 0xDA7A, int(c)]).permutation(len(idx))]
        parts["test"].append(idx[:qt])
        parts["val"].append(idx[qt : qt + qv])
        parts["train"].append(idx[qt + qv :])
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}


def _array_split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, prefix: str, shuffle_seed: int | None) -> SplitSource:
    order = idx if shuffle_seed is None else idx[np.random.default_rng([shuffle_seed, 0x5A1D]).permutation(len(idx))]

    def iterate() -> Iterator[Sample]:
        for i in order:
            yield f"{prefix}_{int(i):08d}", images[i], int(labels[i])

    return SplitSource(len(order), iterate)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def fashion_mnist_source(root: str | Path, *, val_fraction: float, seed: int, limit: int | None) -> Source:
    """Fashion-MNIST: train -> train + val (seeded), test -> test. Keys ``train_00012345`` name the source index."""
    tr_x, tr_y = load_fashion_mnist("train", root=root, limit=limit)
    te_x, te_y = load_fashion_mnist("test", root=root, limit=limit)
    cut = _split_indices(tr_y, val_fraction, 0.0, seed)
    src = Source("fashion_mnist", FASHION_MNIST_CLASSES, 1, 28, 28, hflip=True)
    src.splits["train"] = _array_split(tr_x, tr_y, cut["train"], "train", seed)
    src.splits["val"] = _array_split(tr_x, tr_y, cut["val"], "train", None)
    src.splits["test"] = _array_split(te_x, te_y, np.arange(len(te_x)), "test", None)
    return src


def digits_source(*, val_fraction: float, test_fraction: float, seed: int, limit: int | None) -> Source:
    """scikit-learn digits (8x8, 10 classes) split three ways; keys ``digits_00000042``."""
    x, y = load_digits_images(limit=limit)
    cut = _split_indices(y, val_fraction, test_fraction, seed)
    src = Source("digits", tuple(str(d) for d in range(10)), 1, 8, 8, hflip=False)
    for split in SPLITS:
        src.splits[split] = _array_split(x, y, cut[split], "digits", seed if split == "train" else None)
    return src


def _load_image(path: Path, channels: int, size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"image {path} cannot be read: {exc}") from None


def imagefolder_files(root: str | Path, *, val_fraction: float, test_fraction: float, seed: int,
                      limit: int | None) -> tuple[Path, list[str], dict[str, list[tuple[Path, int]]]]:
    """(root, class names, split -> [(file, label)]) of an ImageFolder tree, train in a seeded order.

    ``root/<split>/<class>/*`` gives the splits (ImageNet's train/ + val/); else ``root/<class>/*``
    is cut by seeded, class-stratified fractions. File suffixes are matched case-insensitively.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder {root} is not a directory")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    class_roots = list(split_dirs.values()) or [root]
    classes = sorted({d.name for r in class_roots for d in r.iterdir() if d.is_dir()})
    if not classes:
        raise ValueError(f"imagefolder {root} has no class subfolders")
    cls_index = {c: i for i, c in enumerate(classes)}

    def files_of(r: Path) -> list[tuple[Path, int]]:
        out = []
        for c in classes:
            if (r / c).is_dir():
                out += [(p, cls_index[c]) for p in sorted((r / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        return out[:limit] if limit is not None else out

    lists = {s: files_of(d) for s, d in split_dirs.items()}
    if not lists:
        everything = files_of(root)
        cut = _split_indices(np.array([lbl for _, lbl in everything]), val_fraction, test_fraction, seed)
        lists = {s: [everything[i] for i in cut[s]] for s in SPLITS}
    if "train" in lists:
        fl = lists["train"]
        lists["train"] = [fl[i] for i in np.random.default_rng([seed, 0x5A1D]).permutation(len(fl))]
    return root, classes, lists


def imagefolder_key(root: Path, path: Path) -> str:
    """``img_<split>_<class>_<stem>``: the file's path below ``root``, a valid WebDataset key (no dots)."""
    rel = path.relative_to(root).with_suffix("")
    return "img_" + "_".join(rel.parts).replace(".", "_")


def imagefolder_source(
    root: str | Path, *, val_fraction: float, test_fraction: float, seed: int, limit: int | None,
    image_size: int | None, channels: int | None,
) -> Source:
    """ImageFolder layout decoded to fixed-size arrays (``image_size`` resizes): ``root/<class>/*``
    (split here) or ``root/<split>/<class>/*``."""
    root, classes, lists = imagefolder_files(root, val_fraction=val_fraction, test_fraction=test_fraction,
                                             seed=seed, limit=limit)
    first = next((fl[0][0] for fl in lists.values() if fl), None)
    if first is None:
        raise ValueError(f"imagefolder {root} holds no images with suffix {IMAGE_SUFFIXES}")
    if channels is None:
        from PIL import Image

        with Image.open(first) as im:
            channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
    probe = _load_image(first, channels, image_size)
    height, width = probe.shape[:2]
    src = Source(f"imagefolder:{root}", tuple(classes), channels, height, width, hflip=True)
    for split, order in lists.items():

        def iterate(order: list[tuple[Path, int]] = order) -> Iterator[Sample]:
            for path, label in order:
                img = _load_image(path, channels, image_size)
                if img.shape[:2] != (height, width):
                    raise ValueError(f"image {path} is {img.shape[1]}x{img.shape[0]}, expected {width}x{height}; pass image_size")
                yield imagefolder_key(root, path), img, label

        src.splits[split] = SplitSource(len(order), iterate)
    return src


def _parse_kv(spec: str, kind: str = "synthetic") -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, spec.split(",")):
        k, sep, v = part.partition("=")
        if not sep:
            raise ValueError(f"{kind} option {part!r} is not key=value")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise ValueError(f"{kind} option {k}={v!r} is not an integer") from None
    return out


def synthetic_source(spec: str, *, val_fraction: float, test_fraction: float, seed: int, limit: int | None) -> Source:
    """``synthetic:n=1000,size=32,channels=3,classes=10``: class prototypes + noise + random shifts.

    Sample i is a function of (seed, i) only, generated in chunks of 256 so any ``n`` streams in
    bounded memory.
    """
    opts = {"n": 1000, "size": 32, "channels": 3, "classes": 10}
    given = _parse_kv(spec)
    unknown = set(given) - set(opts)
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(given)
    n, size, ch, k = opts["n"], opts["size"], opts["channels"], opts["classes"]
    if n < 1 or size < 4 or ch not in (1, 3) or k < 2:
        raise ValueError(f"synthetic options out of range: {opts} (n>=1, size>=4, channels 1 or 3, classes>=2)")
    if limit is not None:
        n = min(n, limit)
    grid = max(2, size // 8)
    protos = np.random.default_rng([seed, 0x9807]).random((k, grid, grid, ch))
    reps = -(-size // grid)
    protos = np.repeat(np.repeat(protos, reps, axis=1), reps, axis=2)[:, :size, :size, :]
    chunk = 256

    def make(i0: int, i1: int) -> Iterator[tuple[int, np.ndarray, int]]:
        for c in range(i0 // chunk, (i1 - 1) // chunk + 1):
            rng = np.random.default_rng([seed, 0x5747, c])
            m = chunk
            labels = rng.integers(0, k, m)
            noise = rng.normal(0.0, 0.12, (m, size, size, ch))
            shifts = rng.integers(-(size // 8), size // 8 + 1, (m, 2))
            for j in range(m):
                i = c * chunk + j
                if i0 <= i < i1:
                    img = np.roll(protos[labels[j]], tuple(shifts[j]), axis=(0, 1)) + noise[j]
                    img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
                    yield i, (img[:, :, 0] if ch == 1 else img), int(labels[j])

    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    src = Source(f"synthetic:n={n},size={size},channels={ch},classes={k}", tuple(f"class{c}" for c in range(k)), ch, size, size, hflip=False)
    for split, (a, b) in bounds.items():

        def iterate(a: int = a, b: int = b) -> Iterator[Sample]:
            if b > a:
                for i, img, label in make(a, b):
                    yield f"synth_{i:09d}", img, label

        src.splits[split] = SplitSource(b - a, iterate)
    return src


def open_source(
    source: str, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
    limit: int | None = None, image_size: int | None = None, channels: int | None = None,
    shorter_side: int | None = None, jpeg_quality: int = 90,
) -> Source:
    """Parse a source name (see the module docstring) into a :class:`Source`.

    ``image_size`` decodes imagefolder images to SIZE x SIZE arrays (PNG in the shards);
    without it imagefolder and webdataset sources keep each image's encoded bytes, and
    ``shorter_side`` (with ``jpeg_quality``) only shrinks those whose shorter side exceeds it.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    kind, _, arg = source.partition(":")
    if kind == "fashion_mnist":
        return fashion_mnist_source(arg or FASHION_MNIST_DIR, val_fraction=val_fraction, seed=seed, limit=limit)
    if kind == "digits":
        return digits_source(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, limit=limit)
    if shorter_side is not None and shorter_side < 8:
        raise ValueError(f"shorter_side must be >= 8, got {shorter_side}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if kind in ("imagefolder", "webdataset") and not arg:
        raise ValueError(f"{kind} source needs a path: {kind}:PATH")
    if kind == "imagefolder" and image_size is not None:
        if shorter_side is not None:
            raise ValueError("pass image_size (decode to SIZE x SIZE) or shorter_side (keep encoded bytes), not both")
        return imagefolder_source(arg, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                  limit=limit, image_size=image_size, channels=channels)
    if kind in ("imagefolder", "webdataset"):
        from .photo_sources import encoded_imagefolder_source, webdataset_source

        make = encoded_imagefolder_source if kind == "imagefolder" else webdataset_source
        return make(arg, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, limit=limit,
                    channels=channels, shorter_side=shorter_side, jpeg_quality=jpeg_quality)
    if kind == "synthetic":
        return synthetic_source(arg, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, limit=limit)
    if kind == "photolike":
        from .photos import photolike_source

        return photolike_source(arg, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, limit=limit)
    raise ValueError(f"unknown source {source!r}; use fashion_mnist[:DIR], digits, imagefolder:PATH, "
                     "webdataset:DIR_OR_PATTERN, synthetic:k=v,... or photolike:k=v,...")
