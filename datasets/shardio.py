"""Reading WebDataset tar shards sample by sample, and decoding one sample.

A shard is read as a tar *stream* (gzip-compressed or not), so it may be a local
path, anything ``webdataset.gopen`` opens (``pipe:cmd``, ``file:``, http(s), gs) or an
fsspec URL (s3://, gcs://, memory://, ...). Members are grouped into samples by key the WebDataset way (the basename up to
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np

from .urls import S3_READ_BUFFER, filesystem, is_local

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp", "npy")
LABEL_EXTS = ("cls", "label", "cls.txt")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of the module docstring's names."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_url(url: str) -> BinaryIO:
    """Open a shard for reading: local paths with ``open``; ``pipe:``, http(s), gs, hf, ... with
    webdataset's gopen; s3 with pyarrow; any other scheme (gcs, az, memory, ...) with fsspec."""
    scheme = urlparse(url).scheme
    if scheme == "file":
        return open(urlparse(url).path, "rb")
    if is_local(url):
        return open(url, "rb")
    from webdataset.gopen import gopen, gopen_schemes

    if scheme in gopen_schemes:
        return gopen(url, "rb")
    if scheme == "s3":  # pyarrow's S3 (endpoint and region from the AWS variables; see urls.py)
        fs, path = filesystem(url)
        return fs.open_input_stream(path, buffer_size=S3_READ_BUFFER)
    import fsspec

    return fsspec.open(url, "rb").open()


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


class TarFormatError(Exception):
    """The byte stream is not (or stops being) a valid tar archive."""


_ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    buf = f.read(n)
    while len(buf) < n:
        more = f.read(n - len(buf))
        if not more:
            raise TarFormatError(f"stream ends {n - len(buf)} bytes early (truncated)")
        buf += more
    return buf


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def iter_tar(f: BinaryIO, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """Yield (member name, data or None) for the regular files of a tar stream (ustar, GNU, pax).

    A small parser instead of :mod:`tarfile`'s, which spends ~70 us per member in Python:
    here a header costs a checksum and a few slices. ``want(name)`` False: the data is
    skipped and None yielded. Raises :class:`TarFormatError` on a bad header or a short stream.
    """
    long_name: str | None = None
    while True:
        hdr = f.read(512)
        if hdr == _ZERO_BLOCK:
            return
        if len(hdr) == 0:  # tar writers always end with zero blocks: a bare end means a cut
            raise TarFormatError("stream ends without the end-of-archive marker (truncated)")
        if len(hdr) < 512:
            hdr += _read_exact(f, 512 - len(hdr))
        try:
            chksum = _number(hdr[148:156])
            size = _number(hdr[124:136])
        except ValueError:
            raise TarFormatError("bad tar header (not a number in size/checksum)") from None
        if chksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarFormatError("bad tar header checksum")
        kind = hdr[156:157]
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        padded = (size + 511) & ~511
        if kind in (b"L", b"x", b"g"):  # GNU long name / pax headers: metadata for the next member
            meta = _read_exact(f, padded)[:size]
            if kind == b"L":
                long_name = meta.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                for rec in meta.decode("utf-8", "replace").split("\n"):
                    if " path=" in rec:
                        long_name = rec.split(" path=", 1)[1]
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if kind in _REGULAR and (want is None or want(name)):
            yield name, _read_exact(f, padded)[:size]
        else:
            _read_exact(f, padded)
            if kind in _REGULAR:
                yield name, None


class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front of it."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(b))
        b[: len(data)] = data
        return len(data)


def _maybe_gunzip(stream: BinaryIO) -> BinaryIO:
    head = stream.read(2)
    joined = io.BufferedReader(_Prefixed(head, stream), 1 << 16)
    if head == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=joined)
    return joined


def read_shard(url: str, wanted: set[int] | None = None) -> ShardRead:
    """Stream ``url`` and keep the samples whose index is in ``wanted`` (all when None).

    Stops as soon as the last wanted index has been read. Gzip-compressed tars are read too.
    """
    out = ShardRead()
    if wanted is not None and not wanted:
        return out
    last = max(wanted) if wanted else None
    try:
        stream = open_url(url)
    except OSError as exc:
        out.error, out.message = "missing_shard", f"{type(exc).__name__}: {exc}"
        return out
    key: str | None = None
    parts: dict[str, bytes] = {}
    members = 0

    def keep(name: str) -> bool:
        # data of samples nobody asked for is skipped, not copied
        if wanted is None:
            return True
        index = out.count if _key_of(name) == key else out.count + (key is not None)
        return index in wanted

    def flush() -> None:
        if key is not None:
            if wanted is None or out.count in wanted:
                out.samples[out.count] = (key, parts)
            out.count += 1

    try:
        for name, data in iter_tar(_maybe_gunzip(stream), keep):
            members += 1
            m = _KEY_RE.match(name)
            if m is None or "/__" in "/" + name:
                continue
            k, ext = m.group(1), m.group(2).lower()
            if k != key:
                flush()
                if last is not None and out.count > last:
                    key = None
                    break  # everything wanted is in hand
                key, parts = k, {}
            if data is not None:
                parts[ext] = data
        flush()
    except (TarFormatError, EOFError, OSError, ValueError) as exc:
        # a shard that broke after some members: the samples before the break are good;
        # the group in progress may be incomplete, so it is dropped
        out.error = "truncated_tar" if members else "unreadable_tar"
        out.message = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            stream.close()
        except Exception as exc:  # e.g. a pipe: command killed by SIGPIPE after an early stop
            log.debug("closing %s: %s", url, exc)
    return out


def _key_of(name: str) -> str | None:
    m = _KEY_RE.match(name)
    return m.group(1) if m else None


def sample_label(parts: dict[str, bytes]) -> int:
    """The label of ``{ext: bytes}`` (its ``.cls`` member); raise :class:`BadSample`."""
    label_raw = next((parts[e] for e in LABEL_EXTS if e in parts), None)
    if label_raw is None:
        raise BadSample("missing_label", f"no label member (one of {LABEL_EXTS}); has {sorted(parts)}")
    try:
        label = int(label_raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad_label", f"label {label_raw[:20]!r} is not an integer") from None
    if label < 0:
        raise BadSample("bad_label", f"label {label} is negative")
    return label


def image_member(parts: dict[str, bytes]) -> str:
    """The extension of the sample's image member (the first of IMAGE_EXTS); raise :class:`BadSample`."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise BadSample("missing_image", f"no image member (one of {IMAGE_EXTS}); has {sorted(parts)}")
    return ext


def decode_sample(parts: dict[str, bytes], channels: int, height: int | None = None,
                  width: int | None = None) -> tuple[np.ndarray, int]:
    """Decode ``{ext: bytes}`` into (image uint8 (H, W, C), label); raise :class:`BadSample`."""
    label = sample_label(parts)
    ext = image_member(parts)
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
