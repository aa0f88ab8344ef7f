"""Check a shard set against its manifest (``verify_shards``) and summarise it (``summarize_shards``)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import read_manifest
from .shardio import IMAGE_EXTS, LABEL_EXTS, read_shard
from .urls import is_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadShard:
    """A shard that failed verification and why (one line)."""

    shard: str
    reason: str


@dataclass
class VerifyReport:
    """Result of :func:`verify_shards`: ``ok`` when every shard in the manifest checks out."""

    folder: Path
    checked: int = 0
    samples: int = 0
    bad: list[BadShard] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # .tar files the manifest does not name (not an error)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def bad_shards(self) -> list[str]:
        return [b.shard for b in self.bad]


def _check_shard(path: Path, expect_samples: int, expect_bytes: int, expect_sha: str) -> str | None:
    """None when the shard is sound, else a one-line reason."""
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if size != expect_bytes:
        return f"size {size} bytes, manifest says {expect_bytes}"
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    if sha != expect_sha:
        return f"sha256 {sha[:12]}..., manifest says {expect_sha[:12]}..."
    read = read_shard(str(path))
    if read.error:
        return f"{read.error}: {read.message}"
    if read.count != expect_samples:
        return f"{read.count} samples, manifest says {expect_samples}"
    for key, parts in read.samples.values():
        if not any(e in parts for e in LABEL_EXTS) or not any(e in parts for e in IMAGE_EXTS):
            return f"sample {key} lacks a label or an image member (has {sorted(parts)})"
    return None


def verify_shards(folder: str | Path) -> VerifyReport:
    """Check every shard the manifest lists: present, size, sha256, tar readable, sample count, members.

    Each bad shard is logged and listed by name in the report; the manifest itself must exist.
    """
    folder = Path(folder)
    man = read_manifest(folder)
    report = VerifyReport(folder)
    for row in man.shards:
        reason = _check_shard(folder / row.shard, row.samples, row.bytes, row.sha256)
        report.checked += 1
        if reason is None:
            report.samples += row.samples
        else:
            log.warning("bad shard %s: %s", row.shard, reason)
            report.bad.append(BadShard(row.shard, reason))
    listed = {r.shard for r in man.shards}
    report.unlisted = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
    return report


@dataclass
class SplitSummary:
    """One split: shards, samples, bytes and class counts (summed over its shards)."""

    split: str
    shards: int
    samples: int
    bytes: int
    class_counts: list[int]

    @property
    def balance(self) -> float:
        """Smallest class count over the largest (1.0 = perfectly balanced)."""
        counts = self.class_counts
        return min(counts) / max(counts) if counts and max(counts) else 0.0


def summarize_shards(folder: str | Path) -> tuple[list[SplitSummary], dict]:
    """Per-split summary of a shard set from its manifest, plus the manifest metadata."""
    if isinstance(folder, str) and not is_local(folder):  # a URL (s3://...): its manifest
        man = read_manifest(folder)
    else:
        man = read_manifest(Path(folder) if Path(folder).is_dir() else Path(folder).parent)
    out = []
    for split in man.splits:
        rows = man.split(split)
        k = max(len(r.class_counts) for r in rows)
        counts = [sum(r.class_counts[c] for r in rows if c < len(r.class_counts)) for c in range(k)]
        out.append(SplitSummary(split, len(rows), sum(r.samples for r in rows), sum(r.bytes for r in rows), counts))
    return out, man.meta


__all__ = ["BadShard", "VerifyReport", "SplitSummary", "verify_shards", "summarize_shards"]
