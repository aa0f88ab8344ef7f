"""The small tar parser agrees with :mod:`tarfile` on every format webdataset writers produce."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from condmoe.datasets.shardio import iter_tar, read_shard


def _archive(fmt: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    members = []
    for i in range(7):
        deep = "d" * 120 if i == 4 else "x"  # a name longer than 100 bytes: ustar prefix, GNU L or pax path
        key = f"{deep}/s{i:03d}"
        members += [(f"{key}.cls", str(i).encode()), (f"{key}.png", bytes(range(i * 30 % 256)) * (i + 1))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), members


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_parser_matches_tarfile(fmt):
    raw, members = _archive(fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        reference = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]
    assert reference == members
    assert list(iter_tar(io.BytesIO(raw))) == members
    skipped = list(iter_tar(io.BytesIO(raw), want=lambda n: n.endswith(".cls")))
    assert skipped == [(n, d if n.endswith(".cls") else None) for n, d in members]


def test_read_shard_selects_gunzips_and_reports_breaks(tmp_path):
    raw, members = _archive(tarfile.GNU_FORMAT)
    plain, packed = tmp_path / "a.tar", tmp_path / "a.tar.gz"
    plain.write_bytes(raw)
    packed.write_bytes(gzip.compress(raw, mtime=0))
    for path in (plain, packed):
        read = read_shard(str(path), {1, 4, 6})
        assert read.error is None and sorted(read.samples) == [1, 4, 6]
        key, parts = read.samples[4]
        assert key == "d" * 120 + "/s004" and parts == {"cls": b"4", "png": members[9][1]}
    whole = read_shard(str(plain))
    assert whole.count == 7 and whole.error is None
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2])
    broken = read_shard(str(cut))
    assert broken.error == "truncated_tar" and 0 < broken.count < 7
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"\x00\x01" * 5000)
    assert read_shard(str(garbage)).error == "unreadable_tar"
    assert read_shard(str(tmp_path / "nope.tar")).error == "missing_shard"
