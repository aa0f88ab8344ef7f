"""Sources that keep each image's original encoded bytes: photo folders and existing WebDataset shards.

A JPEG stays the same JPEG (and a PNG the same PNG) from the source file to the shard
member, so writing ImageNet costs a header parse per image, not a decode and a lossy
re-encode, and the reader's augmentation (:mod:`condmoe.datasets.imaging`) sees the
original pixels at any resolution. Other formats (webp, bmp, gif, tiff, npy) are decoded
once and stored as lossless PNG. ``shorter_side`` is the one opt-in change: images whose
shorter side exceeds it are shrunk to it (aspect kept, Lanczos) and re-encoded (JPEG at
``jpeg_quality``; PNG stays PNG), the usual way to make a full-resolution photo
collection cheaper to decode.

- ``imagefolder:PATH``: ``PATH/<class>/*`` or ``PATH/{train,val,test}/<class>/*``
  (ImageNet's ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``); see
  :func:`condmoe.datasets.sources.imagefolder_files`.
- ``webdataset:DIR`` or ``webdataset:PATTERN``: shards written by other tools, one sample
  = an image member (``.jpg``, ``.png``, ...) + a label member (``.cls``). A folder's shards
  are split by the word in their names (``train``, ``val``/``validation``, ``test``);
  a pattern (brace expansion, ``::``, any URL the reader opens) or a folder without such
  names is one pool cut by seeded, class-stratified fractions. Samples keep their keys
  and their order (shards meant for training are shuffled when written). Class names come
  from a condmoe manifest in the folder, else they are the label numbers.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .shardio import IMAGE_EXTS, LABEL_EXTS, _KEY_RE, TarFormatError, _maybe_gunzip, iter_tar, open_url
from .sources import SPLITS, Encoded, Sample, Source, SplitSource, _split_indices, imagefolder_files, imagefolder_key
from .urls import local_path

log = logging.getLogger(__name__)

KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}  # MPO: a camera's multi-picture JPEG
_GRAY_MODES = ("1", "L", "I", "I;16", "F")
_SPLIT_WORD = re.compile(r"(?:^|[-_.])(train|training|val|valid|validation|test|testing)(?=[-_.]|$)")
_SPLIT_NAME = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


def encode_image(data: bytes, ext: str, name: str, *, shorter_side: int | None = None,
                 jpeg_quality: int = 90) -> Encoded:
    """The :class:`Encoded` form of one image file's bytes: kept when JPEG/PNG, else PNG.

    Only the header is parsed unless the image must change (another format, or its shorter
    side exceeds ``shorter_side``). Raises ValueError naming ``name`` when it is no image.
    """
    from PIL import Image

    try:
        if ext == "npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                raise ValueError(f"npy image must be uint8 (H, W) or (H, W, C), got {arr.dtype} {arr.shape}")
            data, ext = _png(Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)), "png"
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            if shorter_side is not None and min(w, h) > shorter_side:
                return _shrink(im, shorter_side, jpeg_quality)
            if fmt in KEEP_FORMATS:
                return Encoded(data, KEEP_FORMATS[fmt], w, h)
            im.load()
            return Encoded(_png(im), "png", w, h)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"image {name} cannot be read: {type(exc).__name__}: {exc}") from None


def _png(im) -> bytes:
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _shrink(im, shorter_side: int, quality: int) -> Encoded:
    """``im`` resized so its shorter side is ``shorter_side`` (aspect kept); JPEG, or PNG for a PNG."""
    from PIL import Image

    w, h = im.size
    scale = shorter_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    as_png = im.format == "PNG"
    if im.format in ("JPEG", "MPO"):
        im.draft("RGB" if im.mode not in _GRAY_MODES else "L", size)  # DCT-domain 1/2..1/8 first: cheap
    mode = "L" if im.mode in _GRAY_MODES else ("RGBA" if as_png and "A" in im.mode else "RGB")
    small = im.convert(mode).resize(size, Image.Resampling.LANCZOS)
    if as_png:
        return Encoded(_png(small), "png", *size)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return Encoded(buf.getvalue(), "jpg", *size)


def _channels_of(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return 1 if im.mode in _GRAY_MODES else 3


def encoded_imagefolder_source(root: str, *, val_fraction: float, test_fraction: float, seed: int,
                               limit: int | None, channels: int | None, shorter_side: int | None,
                               jpeg_quality: int) -> Source:
    """An ImageFolder tree with every image's encoded bytes kept (see the module docstring)."""
    root_path, classes, lists = imagefolder_files(root, val_fraction=val_fraction, test_fraction=test_fraction,
                                                  seed=seed, limit=limit)
    first = next((fl[0][0] for fl in lists.values() if fl), None)
    if first is None:
        raise ValueError(f"imagefolder {root_path} holds no images")
    if channels is None:  # the first image decides, as for decoded folders: a gray folder reads as 1 channel
        channels = _channels_of(encode_image(first.read_bytes(), first.suffix.lower().lstrip("."), str(first)).data)
    src = Source(f"imagefolder:{root_path}", tuple(classes), channels, None, None, hflip=True, encoded=True)
    for split, order in lists.items():

        def iterate(order: list[tuple[Path, int]] = order) -> Iterator[Sample]:
            for path, label in order:
                enc = encode_image(path.read_bytes(), path.suffix.lower().lstrip("."), str(path),
                                   shorter_side=shorter_side, jpeg_quality=jpeg_quality)
                yield imagefolder_key(root_path, path), enc, label

        src.splits[split] = SplitSource(len(order), iterate)
    return src


def _shard_lists(spec: str) -> tuple[dict[str, list[str]] | None, list[str]]:
    """(split -> shard URLs when the names say, all shard URLs) of a folder or a pattern."""
    folder = local_path(spec)  # None unless spec is one local path
    if folder is not None and folder.is_dir():
        names = sorted(p for p in folder.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        urls = [str(p) for p in names]
        if not urls:
            raise ValueError(f"webdataset folder {spec} holds no .tar / .tar.gz / .tgz shards")
        words = {u: _SPLIT_WORD.findall(Path(u).name.lower()) for u in urls}
        if not any(words.values()):
            return None, urls
        unnamed = [Path(u).name for u, w in words.items() if not w]
        if unnamed:
            raise ValueError(f"webdataset folder {spec}: shards {unnamed[:3]} name no split (train/val/test) "
                             "while others do; pass a pattern to cut one pool by fractions instead")
        by_split: dict[str, list[str]] = {}
        for u in urls:
            w = words[u][-1]
            by_split.setdefault(_SPLIT_NAME.get(w, w), []).append(u)
        return by_split, urls
    import braceexpand

    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"webdataset pattern {spec!r} expands to nothing")
    return None, urls


def _groups(url: str, want_data) -> Iterator[tuple[int, str, dict[str, bytes | None]]]:
    """(index, key, {ext: data or None}) per sample group of a shard, in order; ``want_data(index, ext)``."""
    try:
        stream = open_url(url)
    except OSError as exc:
        raise ValueError(f"shard {url} cannot be opened: {exc}") from None
    index, key, parts = -1, None, {}

    def want(name: str) -> bool:
        m = _KEY_RE.match(name)
        if m is None:
            return False
        return want_data(index + (m.group(1) != key), m.group(2).lower())

    try:
        for name, data in iter_tar(_maybe_gunzip(stream), want):
            m = _KEY_RE.match(name)
            if m is None or "/__" in "/" + name:
                continue
            if m.group(1) != key:
                if key is not None:
                    yield index, key, parts
                index, key, parts = index + 1, m.group(1), {}
            parts[m.group(2).lower()] = data
        if key is not None:
            yield index, key, parts
    except (TarFormatError, EOFError, OSError) as exc:
        raise ValueError(f"shard {url} is not a readable tar: {type(exc).__name__}: {exc}") from None
    finally:
        stream.close()


def _index(url: str) -> list[tuple[str, int, str]]:
    """(key, label, image ext) of every sample of a shard, reading only the label members' data."""
    out = []
    for _, key, parts in _groups(url, lambda i, ext: ext in LABEL_EXTS):
        label_ext = next((e for e in LABEL_EXTS if e in parts), None)
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if label_ext is None or image_ext is None:
            raise ValueError(f"shard {url}: sample {key} lacks a label ({LABEL_EXTS}) or an image ({IMAGE_EXTS}) "
                             f"member; it has {sorted(parts)}")
        try:
            label = int(parts[label_ext].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"shard {url}: sample {key} label {parts[label_ext][:20]!r} is not an integer") from None
        if label < 0:
            raise ValueError(f"shard {url}: sample {key} has negative label {label}")
        out.append((key, label, image_ext))
    return out


def webdataset_source(spec: str, *, val_fraction: float, test_fraction: float, seed: int, limit: int | None,
                      channels: int | None, shorter_side: int | None, jpeg_quality: int) -> Source:
    """Existing WebDataset image shards as a source, bytes kept (see the module docstring)."""
    by_split, urls = _shard_lists(spec)
    index = {u: _index(u) for u in urls}  # one pass over the tars, label members only
    flat = [(u, i) for u in urls for i in range(len(index[u]))]
    if not flat:
        raise ValueError(f"webdataset source {spec!r} holds no samples")
    labels = np.array([index[u][i][1] for u, i in flat], dtype=np.int64)
    if by_split is None:
        keep = flat[:limit] if limit is not None else flat
        cut = _split_indices(labels[: len(keep)], val_fraction, test_fraction, seed)
        members = {s: [keep[j] for j in cut[s]] for s in SPLITS}
    else:
        members = {s: [(u, i) for u in us for i in range(len(index[u]))] for s, us in by_split.items()}
        members = {s: m[:limit] if limit is not None else m for s, m in members.items()}
    classes: list[str] = [str(c) for c in range(int(labels.max()) + 1)]
    folder = local_path(spec)
    if folder is not None and folder.is_dir() and (folder / "manifest.parquet").exists():
        from .manifest import read_manifest

        named = read_manifest(folder).meta.get("classes")
        if named and len(named) >= len(classes):
            classes = list(named)
    if channels is None:
        u0, i0 = flat[0]
        ext0 = index[u0][i0][2]
        first = next(p for j, _, p in _groups(u0, lambda j, e: j == i0 and e == ext0) if j == i0)
        channels = _channels_of(encode_image(first[ext0], ext0, f"{u0} sample {index[u0][i0][0]}").data)
    src = Source(f"webdataset:{spec}", tuple(classes), channels, None, None, hflip=True, encoded=True)
    for split, mem in members.items():

        def iterate(mem: list[tuple[str, int]] = mem) -> Iterator[Sample]:
            wanted: dict[str, set[int]] = {}
            for u, i in mem:
                wanted.setdefault(u, set()).add(i)
            for u in dict.fromkeys(u for u, _ in mem):  # shard order as listed
                want, last = wanted[u], max(wanted[u])
                groups = _groups(u, lambda j, ext, want=want: j in want)
                for i, key, parts in groups:
                    if i in want:
                        _, label, ext = index[u][i]
                        enc = encode_image(parts[ext], ext, f"{u} sample {key}", shorter_side=shorter_side,
                                           jpeg_quality=jpeg_quality)
                        yield key.replace("/", "_"), enc, label
                    if i == last:
                        groups.close()  # the rest of the shard holds nothing this split wants
                        break

        src.splits[split] = SplitSource(len(mem), iterate)
    return src
