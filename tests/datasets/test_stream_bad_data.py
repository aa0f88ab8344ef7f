"""Bad data: each kind is skipped, counted by reason, topped up; ranks keep equal steps; verify names it."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from condmoe.datasets import StreamingLoader, verify_shards
from condmoe.datasets.plan import epoch_sequence, shard_order
from condmoe.datasets.shardio import BadSample, decode_sample, read_shard

B, W, SEED = 16, 2, 11


def _rewrite(path: Path, change) -> None:
    """Rewrite a tar member by member; ``change(name, data)`` returns new bytes or None to drop the member."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            data = change(m.name, data)
            if data is not None:
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))


def _first_shard(folder: Path) -> tuple[Path, int]:
    """The shard read first in epoch 0 (with mix_shards=1 its loss empties whole batches: the look-ahead path)."""
    ld = StreamingLoader(folder, "train", B, world_size=W, seed=SEED)
    s = int(shard_order(len(ld.shards), SEED, 0)[0])
    return folder / ld.shards[s].name, s


def _damage(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated_tar":
        path.write_bytes(data[: len(data) // 2 + 700])
    elif kind == "unreadable_tar":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif kind == "missing_shard":
        path.unlink()
    elif kind == "missing_label":
        victims = sorted({n.split(".")[0] for n in tarfile.open(path).getnames()})[3:5]
        _rewrite(path, lambda n, d: None if n.split(".")[0] in victims and n.endswith(".cls") else d)
    elif kind == "bad_image":
        victims = sorted({n.split(".")[0] for n in tarfile.open(path).getnames()})[10:13]
        _rewrite(path, lambda n, d: d[:20] + b"garbage" * 3 if n.split(".")[0] in victims and n.endswith(".png") else d)


def _expected_bad(folder: Path, s: int, kind: str, readable: dict, mix: int) -> int:
    """How many of the epoch's consumed positions fall on samples of shard ``s`` that this damage spoils."""
    ld = StreamingLoader(folder, "train", B, world_size=W, seed=SEED, mix_shards=mix)
    seq_s, seq_i = epoch_sequence([x.samples for x in ld.shards], SEED, 0, mix_shards=mix)
    used = len(ld) * B * W
    consumed = [int(i) for sh, i in zip(seq_s[:used], seq_i[:used]) if sh == s]
    good = {i for i, (_, parts) in readable.items() if _decodes(parts)}
    return sum(1 for i in consumed if i not in good)


def _decodes(parts: dict) -> bool:
    try:
        decode_sample(parts, 1, 8, 8)
        return True
    except BadSample:
        return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, num_workers, mix", [
    ("truncated_tar", 0, 4), ("unreadable_tar", 0, 1), ("missing_shard", 2, 1), ("missing_shard", 0, 4),
    ("missing_label", 0, 4), ("bad_image", 1, 4),
])
def test_bad_data_is_skipped_counted_and_topped_up(digits_copy, kind, num_workers, mix, caplog):
    path, s = _first_shard(digits_copy)
    _damage(kind, path)
    readable = read_shard(str(path)).samples if path.exists() else {}
    expected = _expected_bad(digits_copy, s, kind, readable, mix)
    assert expected > 0

    totals, keys, steps = Counter(), [], []
    for r in range(W):
        ld = StreamingLoader(digits_copy, "train", B, rank=r, world_size=W, seed=SEED, num_workers=num_workers,
                             mix_shards=mix)
        n = 0
        for batch in ld:
            assert len(batch.keys) == B and batch.images.shape[0] == B and batch.labels.shape == (B,)
            keys += batch.keys
            n += 1
        steps.append(n)
        totals.update(ld.bad_samples)
    assert steps == [1258 // (B * W)] * W  # equal steps on every rank, nothing lost
    assert dict(totals) == {kind: expected}
    fills = [k for k in keys if "#fill" in k]
    real = [k for k in keys if "#fill" not in k]
    assert len(fills) == expected and len(real) == len(set(real)) == len(keys) - expected
    assert {k.split("#")[0] for k in fills} <= set(real)  # top-ups are copies of good samples

    if num_workers == 0:  # (worker processes log to their own stderr)
        assert any(path.name in rec.getMessage() and rec.levelname == "WARNING" for rec in caplog.records)
    report = verify_shards(digits_copy)
    assert not report.ok and report.bad_shards == [path.name]


def test_random_bytes_shard_is_not_mistaken_for_a_gzip_or_tar(digits_copy):
    path, _ = _first_shard(digits_copy)
    _damage("unreadable_tar", path)
    read = read_shard(str(path))
    assert read.error == "unreadable_tar" and read.count == 0


def test_a_set_with_every_shard_missing_raises_clearly(tmp_path):
    from condmoe.datasets import write_shards

    d = write_shards("digits", tmp_path / "d", samples_per_shard=50, limit=200)
    for p in d.glob("train-*.tar"):
        p.unlink()
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(StreamingLoader(d, "train", 10))
