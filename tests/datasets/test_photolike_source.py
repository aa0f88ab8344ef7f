"""``photolike:`` generated photo-like JPEGs: deterministic, stratified, stored as encoded JPEG, readable at any resolution."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from condmoe.datasets import StreamingLoader, read_manifest, write_shards
from condmoe.datasets.shardio import read_shard
from condmoe.datasets.sources import open_source

SPEC = "photolike:n=40,classes=4,min_side=32,max_side=64,quality=85"


def test_splits_labels_and_geometry():
    src = open_source(SPEC, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert src.encoded and src.channels == 3 and src.height is None and src.classes == tuple(f"class{c}" for c in range(4))
    assert {s: sp.n for s, sp in src.splits.items()} == {"train": 28, "val": 4, "test": 8}
    samples = {s: list(sp.iterate()) for s, sp in src.splits.items()}
    keys = [k for ss in samples.values() for k, _, _ in ss]
    assert len(set(keys)) == 40
    for split, ss in samples.items():
        counts = [sum(1 for _, _, y in ss if y == c) for c in range(4)]
        assert max(counts) - min(counts) <= 1, (split, counts)  # stratified
        for _, enc, _ in ss:
            with Image.open(io.BytesIO(enc.data)) as im:
                assert im.format == "JPEG" and im.size == (enc.width, enc.height)
                assert 32 <= min(im.size) <= 64
    # the same seed gives the same bytes; another seed other images
    again = open_source(SPEC, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert [e.data for _, e, _ in again.splits["test"].iterate()] == [e.data for _, e, _ in samples["test"]]
    other = open_source(SPEC, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert [e.data for _, e, _ in other.splits["test"].iterate()] != [e.data for _, e, _ in samples["test"]]


def test_bad_options_name_the_source():
    with pytest.raises(ValueError, match="unknown photolike option"):
        open_source("photolike:n=10,size=3")
    with pytest.raises(ValueError, match="photolike option 'n=x' is not an integer|photolike option n="):
        open_source("photolike:n=x")
    with pytest.raises(ValueError, match="out of range"):
        open_source("photolike:n=10,classes=1")


def test_written_shards_keep_the_jpeg_bytes_and_read_at_a_resolution(tmp_path):
    out = write_shards(SPEC, tmp_path / "shards", samples_per_shard=16, limit=24)
    man = read_manifest(out)
    assert man.meta["encoded"] == "original" and man.meta["image_ext"] == "jpg"
    assert sum(s.samples for s in man.shards) == 24
    src = {k: e.data for sp in open_source(SPEC, limit=24).splits.values() for k, e, _ in sp.iterate()}
    for row in man.shards:
        for key, parts in read_shard(str(out / row.shard)).samples.values():
            assert parts["jpg"] == src[key]
    batch = next(iter(StreamingLoader(out, "train", 4, augment=True, resolution=24)))
    assert tuple(batch.images.shape) == (4, 3, 24, 24)
