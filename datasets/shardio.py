"""Reading WebDataset tar shards sample by sample, and decoding one sample.

A shard is read as a tar *stream* (``tarfile`` mode ``r|*``), so it may be a local
path or anything ``webdataset.gopen`` opens (``pipe:cmd``, ``file:``, http(s), cloud
URLs). Members are grouped into samples by key the WebDataset way (the basename up to
its first dot), and sample ``j`` of a shard is the ``j``-th group.

Failures are reported by reason instead of raised: ``missing_shard`` (cannot be
opened), ``unreadable_tar`` (not a tar at all, e.g. random bytes),
``truncated_tar`` (the stream ends or breaks before the manifest's count);
per sample ``missing_label``, ``bad_label``, ``missing_image``, ``bad_image``,
``bad_shape``. Nothing here sleeps or retries.
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp", "npy")
LABEL_EXTS = ("cls", "label", "cls.txt")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of the module docstring's names."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_local(url: str) -> bool:
    """True for a plain path or a ``file:`` URL (read with ``open``; seekable)."""
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # one letter: a Windows drive


def open_url(url: str) -> BinaryIO:
    """Open a shard for reading: local paths with ``open``, anything else with webdataset's gopen."""
    if urlparse(url).scheme == "file":
        return open(urlparse(url).path, "rb")
    if is_local(url):
        return open(url, "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def shard_name(url: str) -> str:
    """The file name of a shard URL (``pipe:cat /x/train-000001.tar`` -> ``train-000001.tar``)."""
    return Path(url.split()[-1] if url.startswith("pipe:") else urlparse(url).path or url).name


@dataclass
class ShardRead:
    """What reading a shard gave: ``samples[j] = (key, {ext: bytes})`` for the wanted ``j``s."""

    samples: dict[int, tuple[str, dict[str, bytes]]] = field(default_factory=dict)
    count: int = 0  # sample groups seen
    error: str | None = None  # missing_shard / unreadable_tar / truncated_tar
    message: str = ""


def read_shard(url: str, wanted: set[int] | None = None) -> ShardRead:
    """Stream ``url`` and keep the samples whose index is in ``wanted`` (all when None).

    Stops as soon as the last wanted index has been read.
    """
    out = ShardRead()
    last = max(wanted) if wanted else None
    if wanted is not None and not wanted:
        return out
    try:
        stream = open_url(url)
    except OSError as exc:
        out.error, out.message = "missing_shard", f"{type(exc).__name__}: {exc}"
        return out
    key: str | None = None
    parts: dict[str, bytes] = {}
    members = 0

    def flush() -> None:
        if key is not None:
            if wanted is None or out.count in wanted:
                out.samples[out.count] = (key, parts)
            out.count += 1

    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for ti in tf:
                members += 1
                if not ti.isreg():
                    continue
                m = _KEY_RE.match(ti.name)
                if m is None or "/__" in "/" + ti.name:
                    continue
                k, ext = m.group(1), m.group(2).lower()
                if k != key:
                    flush()
                    if last is not None and out.count > last:
                        return out
                    key, parts = k, {}
                f = tf.extractfile(ti)
                parts[ext] = f.read() if f is not None else b""
            flush()
            key = None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # a shard that broke after some members: the samples before the break are good
        out.error = "truncated_tar" if members else "unreadable_tar"
        out.message = f"{type(exc).__name__}: {exc}"
        # the group in progress may be incomplete: drop it
    return out


def decode_sample(parts: dict[str, bytes], channels: int, height: int | None = None,
                  width: int | None = None) -> tuple[np.ndarray, int]:
    """Decode ``{ext: bytes}`` into (image uint8 (H, W, C), label); raise :class:`BadSample`."""
    label_raw = next((parts[e] for e in LABEL_EXTS if e in parts), None)
    if label_raw is None:
        raise BadSample("missing_label", f"no label member (one of {LABEL_EXTS}); has {sorted(parts)}")
    try:
        label = int(label_raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad_label", f"label {label_raw[:20]!r} is not an integer") from None
    if label < 0:
        raise BadSample("bad_label", f"label {label} is negative")
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise BadSample("missing_image", f"no image member (one of {IMAGE_EXTS}); has {sorted(parts)}")
    try:
        if ext == "npy":
            img = np.load(io.BytesIO(parts[ext]), allow_pickle=False)
            if img.dtype != np.uint8:
                raise ValueError(f"npy image dtype {img.dtype}, expected uint8")
        else:
            from PIL import Image

            with Image.open(io.BytesIO(parts[ext])) as im:
                want = "L" if channels == 1 else "RGB"
                img = np.asarray(im if im.mode == want else im.convert(want), dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadSample("bad_image", f"{ext} does not decode: {type(exc).__name__}: {exc}") from None
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] != channels or (height is not None and img.shape[:2] != (height, width)):
        raise BadSample("bad_shape", f"image shape {img.shape}, expected ({height}, {width}, {channels})")
    return img, label


def probe_shard(url: str) -> tuple[int, tuple[int, int, int] | None, str | None]:
    """(sample count, (H, W, C) of the first decodable sample or None, error reason or None)."""
    read = read_shard(url)
    shape = None
    for _, (_, parts) in sorted(read.samples.items()):
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None:
            continue
        try:
            if ext == "npy":
                img = np.load(io.BytesIO(parts[ext]), allow_pickle=False)
            else:
                from PIL import Image

                with Image.open(io.BytesIO(parts[ext])) as im:
                    img = np.asarray(im.convert("L") if im.mode in ("1", "I", "I;16", "F") else im)
            shape = (img.shape[0], img.shape[1], 1 if img.ndim == 2 else img.shape[2])
            break
        except Exception:  # keep looking at the next sample
            continue
    return read.count, shape, read.error
