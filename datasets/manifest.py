"""``manifest.parquet``: one row per shard (split, shard, samples, bytes, sha256, class counts).

Dataset-wide facts (source, class names, image geometry, per-channel mean/std of the
train split, whether horizontal flips keep labels) travel in the Parquet schema
metadata under the key ``condmoe``. A shard set is complete exactly when its
manifest exists: the writer publishes the manifest last, inside a temporary folder
that is renamed into place.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .urls import filesystem, is_local, is_s3, local_path

MANIFEST_NAME = "manifest.parquet"
FORMAT_VERSION = 1

SCHEMA = pa.schema([
    ("split", pa.string()),
    ("shard", pa.string()),
    ("samples", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("class_counts", pa.list_(pa.int64())),
    ("first_key", pa.string()),
])


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    split: str
    shard: str
    samples: int
    bytes: int
    sha256: str
    class_counts: tuple[int, ...]
    first_key: str = ""


@dataclass
class Manifest:
    """All shards of a set plus its metadata (``meta``: source, classes, channels, height, width, mean, std, hflip)."""

    shards: list[ShardInfo]
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> list[ShardInfo]:
        """Shards of one split in name order; a ValueError names the split when it has none."""
        rows = sorted((s for s in self.shards if s.split == name), key=lambda s: s.shard)
        if not rows:
            have = sorted({s.split for s in self.shards})
            raise ValueError(f"split {name!r} has no shards in this manifest; splits: {have}")
        return rows

    @property
    def splits(self) -> list[str]:
        order = {"train": 0, "val": 1, "test": 2}
        return sorted({s.split for s in self.shards}, key=lambda s: (order.get(s, 9), s))


def write_manifest(path: str | Path, shards: list[ShardInfo], meta: dict) -> None:
    """Write ``shards`` + ``meta`` to ``path`` (a Parquet file)."""
    cols = {name: [getattr(s, name) for s in shards] for name in SCHEMA.names}
    cols["class_counts"] = [list(c) for c in cols["class_counts"]]
    meta = {"format": FORMAT_VERSION, **meta}
    schema = SCHEMA.with_metadata({b"condmoe": json.dumps(meta, sort_keys=True).encode()})
    pq.write_table(pa.table(cols, schema=schema), str(path))


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest from a shard folder, the .parquet file itself, or a folder URL (s3://, fsspec's)."""
    if isinstance(path, str) and not is_local(path):
        url = path if path.endswith(".parquet") else f"{path.rstrip('/')}/{MANIFEST_NAME}"
        try:
            table = pq.read_table(io.BytesIO(_read_url(url)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no {MANIFEST_NAME} at {url} (not a complete shard set)") from None
        return _from_table(table, url)
    path = local_path(str(path)) or Path(path)  # file:///d -> /d
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {path} (not a complete shard set)")
    return _from_table(pq.read_table(str(path)), str(path))


def _read_url(url: str) -> bytes:
    """The bytes of one object: s3:// with pyarrow's S3 filesystem, other schemes with fsspec."""
    if is_s3(url):
        fs, path = filesystem(url)
        try:
            with fs.open_input_file(path) as f:
                return f.read()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or "NoSuchKey" in str(exc) or "not found" in str(exc).lower():
                raise FileNotFoundError(url) from None
            raise OSError(f"{url}: {' '.join(str(exc).split())[:300]}") from None
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def _from_table(table: pa.Table, path: str) -> Manifest:
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    raw = (table.schema.metadata or {}).get(b"condmoe", b"{}")
    meta = json.loads(raw)
    rows = table.to_pylist()
    shards = [
        ShardInfo(r["split"], r["shard"], int(r["samples"]), int(r["bytes"]), r["sha256"],
                  tuple(int(c) for c in r["class_counts"] or ()), r["first_key"] or "")
        for r in rows
    ]
    return Manifest(shards, meta)
