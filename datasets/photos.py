"""Photo-like JPEG folders for tests, benchmarks and CPU demo jobs (nothing is downloaded).

Each image is a colour gradient, a few filled ellipses and rectangles, a smooth blur and
sensor-like noise, saved as a real JPEG (or PNG) of its own size and aspect ratio, so the
image path meets what a photo collection gives it: varying geometry, chroma-subsampled
JPEG, no two files alike. The class sets the gradient's hue and the shapes' colour, so a
small network can learn the classes. Everything is a function of ``seed``.

Layouts: ``flat`` is ``root/<class>/<class>_<i>.jpg`` (torchvision ImageFolder);
``imagenet`` is ImageNet's ``root/train/<wnid>/<wnid>_<i>.JPEG`` and
``root/val/<wnid>/ILSVRC2012_val_<n>.JPEG``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def photo_like(rng: np.random.Generator, width: int, height: int, label: int, num_classes: int) -> np.ndarray:
    """One photo-like RGB image: uint8 (height, width, 3)."""
    from PIL import Image, ImageDraw, ImageFilter

    hue = (label + 0.5) / num_classes + rng.normal(0, 0.03)
    base = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 0.35 + 0.5
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)[..., None]
    img = np.clip((base[None, None] * (0.6 + 0.5 * ramp)) * 255, 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        shade = np.clip(base[::-1] * 255 * rng.uniform(0.6, 1.3) + rng.normal(0, 20, 3), 0, 255).astype(int)
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        (draw.ellipse if (label + _) % 2 else draw.rectangle)(box, fill=tuple(int(v) for v in shade))
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    out = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def _sizes(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    short = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))  # portrait to wide landscape
    long = max(short, int(round(short * (aspect if aspect >= 1 else 1 / aspect))))
    return (long, short) if aspect >= 1 else (short, long)  # (width, height)


def make_photo_folder(root: str | Path, *, classes: int = 4, per_class: int = 24, val_per_class: int = 0,
                      layout: str = "flat", min_side: int = 48, max_side: int = 160, quality: int = 90,
                      png_every: int = 0, seed: int = 0) -> Path:
    """Write photo-like JPEGs in class folders under ``root``; return ``root``.

    ``layout="imagenet"`` writes ``train/`` (``per_class`` each) and ``val/`` (``val_per_class``
    each) with ImageNet's names (wnid folders ``n0000000k``, ``.JPEG``); ``flat`` writes
    ``per_class`` images per class folder. Shorter sides are drawn from [min_side, max_side],
    aspect ratios from 0.6 to 1.7. ``png_every=k`` saves every k-th image as PNG instead.
    """
    from PIL import Image

    if layout not in ("flat", "imagenet"):
        raise ValueError(f"layout must be 'flat' or 'imagenet', got {layout!r}")
    if classes < 1 or per_class < 1 or not 8 <= min_side <= max_side:
        raise ValueError(f"classes {classes}, per_class {per_class} must be >= 1 and 8 <= min_side {min_side} <= "
                         f"max_side {max_side}")
    root = Path(root)
    rng = np.random.default_rng([seed, 0xF070])
    names = [f"n{c:08d}" for c in range(classes)] if layout == "imagenet" else [f"class{c}" for c in range(classes)]
    plan = [("train" if layout == "imagenet" else "", per_class)]
    if layout == "imagenet" and val_per_class:
        plan.append(("val", val_per_class))
    n_written = 0
    for split, count in plan:
        for c, name in enumerate(names):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = _sizes(rng, min_side, max_side)
                img = Image.fromarray(photo_like(rng, w, h, c, classes))
                n_written += 1
                as_png = png_every > 0 and n_written % png_every == 0
                if split == "val":
                    stem = f"ILSVRC2012_val_{c * count + i + 1:08d}"
                else:
                    stem = f"{name}_{i}"
                ext = ".png" if as_png else (".JPEG" if layout == "imagenet" else ".jpg")
                if as_png:
                    img.save(folder / f"{stem}{ext}", format="PNG")
                else:
                    img.save(folder / f"{stem}{ext}", format="JPEG", quality=quality)
    return root


PHOTOLIKE_DEFAULTS = {"n": 1000, "classes": 10, "min_side": 160, "max_side": 320, "quality": 90}


def photolike_source(spec: str, *, val_fraction: float, test_fraction: float, seed: int, limit: int | None):
    """``photolike:n=1000,classes=10,min_side=160,max_side=320,quality=90``: generated photo-like JPEGs.

    The source for a job on the photo path when no photo collection is at hand: what
    :func:`make_photo_folder` would write, as a source, so nothing lands on disk but the shards.
    Image i (class i mod ``classes``) is a function of (seed, i) alone, its shorter side drawn from
    [min_side, max_side] and its aspect ratio from 0.6 to 1.7, JPEG at ``quality`` (chroma-subsampled,
    as cameras save them). train/val/test are seeded class-stratified cuts (``val_fraction``,
    ``test_fraction``); the train split is written in a seeded shuffled order. ``limit`` caps ``n``.
    """
    import io

    from PIL import Image

    from .sources import Encoded, Source, SplitSource, _parse_kv, _split_indices

    opts = dict(PHOTOLIKE_DEFAULTS)
    given = _parse_kv(spec, kind="photolike")
    unknown = set(given) - set(opts)
    if unknown:
        raise ValueError(f"unknown photolike option(s) {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(given)
    n, k, lo, hi, quality = (opts[x] for x in ("n", "classes", "min_side", "max_side", "quality"))
    if n < 1 or k < 2 or not 8 <= lo <= hi or not 1 <= quality <= 100:
        raise ValueError(f"photolike options out of range: {opts} (n >= 1, classes >= 2, "
                         "8 <= min_side <= max_side, quality 1-100)")
    if limit is not None:
        n = min(n, limit)
    labels = np.arange(n) % k
    cut = _split_indices(labels, val_fraction, test_fraction, seed)
    cut["train"] = cut["train"][np.random.default_rng([seed, 0x5A1D]).permutation(len(cut["train"]))]
    name = f"photolike:n={n},classes={k},min_side={lo},max_side={hi},quality={quality}"
    src = Source(name, tuple(f"class{c}" for c in range(k)), 3, None, None, hflip=True, encoded=True)

    def image(i: int) -> Encoded:
        rng = np.random.default_rng([seed, 0xF071, i])
        w, h = _sizes(rng, lo, hi)
        buf = io.BytesIO()
        Image.fromarray(photo_like(rng, w, h, int(labels[i]), k)).save(buf, format="JPEG", quality=quality)
        return Encoded(buf.getvalue(), "jpg", w, h)

    for split, idx in cut.items():

        def iterate(idx: np.ndarray = idx):
            for i in idx:
                yield f"photo_{int(i):09d}", image(int(i)), int(labels[i])

        src.splits[split] = SplitSource(len(idx), iterate)
    return src
