"""Interoperability with plain webdataset: each reads the other's shards; URL and pipe: sources."""

from __future__ import annotations

import numpy as np
import webdataset as wds
from ds_helpers import denormalise, read_epoch

from condmoe.datasets import StreamingLoader, read_manifest
from condmoe.datasets.idx import load_digits_images


def test_condmoe_reads_shards_written_by_webdataset_shardwriter(tmp_path):
    x, y = load_digits_images(limit=300)
    with wds.ShardWriter(str(tmp_path / "wds-%06d.tar"), maxcount=64, verbose=0) as sink:
        for i in range(len(x)):
            sink.write({"__key__": f"s{i:05d}", "png": x[i], "cls": int(y[i])})
    pattern = str(tmp_path / "wds-{000000..000004}.tar")
    ld = StreamingLoader(pattern, "train", 30)  # no manifest: counts come from reading each shard once
    assert [s.samples for s in ld.shards] == [64, 64, 64, 64, 44]
    seen = {}
    for batch in ld:
        for key, img, label in zip(batch.keys, denormalise(batch.images, ld), batch.labels.tolist()):
            seen[key] = (img, label)
    assert len(seen) == 300
    for key, (img, label) in seen.items():
        i = int(key[1:])
        assert label == y[i]
        np.testing.assert_array_equal(img[:, :, 0], x[i])


def test_plain_webdataset_reads_condmoe_shards(digits_dir):
    x, y = load_digits_images()
    names = [r.shard for r in read_manifest(digits_dir).split("test")]
    urls = [str(digits_dir / n) for n in names]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "png", "cls")
    n = 0
    for key, img, label in ds:
        i = int(key.split("_")[1])
        assert label == y[i]
        np.testing.assert_array_equal(np.asarray(img.convert("L")), x[i])
        n += 1
    assert n == 359


def test_pipe_and_brace_urls(digits_dir):
    pattern = f"pipe:cat {digits_dir}/val-{{000000..000001}}.tar"
    by_pipe = StreamingLoader(pattern, "val", 36, seed=4)
    by_dir = StreamingLoader(digits_dir, "val", 36, seed=4)
    assert [s.samples for s in by_pipe.shards] == [100, 80]
    # same shard list and seed: same order; the pipe set has no manifest, so it normalises with 0.5/0.5
    assert read_epoch(by_pipe) == read_epoch(by_dir)
    # two ranks each stop reading a shard early (their last wanted sample): closing the pipe is no error
    by_rank = [StreamingLoader(f"pipe:cat {digits_dir}/train-{{000000..000012}}.tar", "train", 50, rank=r,
                               world_size=2, seed=4) for r in (0, 1)]
    keys = [k for ld in by_rank for k in read_epoch(ld)]
    assert len(set(keys)) == len(keys) == 1258 // 100 * 100 and not any("#fill" in k for k in keys)
    assert all(not ld.bad_samples for ld in by_rank)
    local = StreamingLoader(f"{digits_dir}/train-{{000000..000012}}.tar", "train", 50, seed=4)
    assert local.mean == read_manifest(digits_dir).meta["mean"]  # a manifest beside local shards is used
    assert read_epoch(local) == read_epoch(StreamingLoader(digits_dir, "train", 50, seed=4))


def test_fsspec_and_file_urls(digits_dir):
    import fsspec

    fs = fsspec.filesystem("memory")
    names = [r.shard for r in read_manifest(digits_dir).split("val")]
    for n in names:
        fs.pipe(f"/condmoe-test/{n}", (digits_dir / n).read_bytes())
    try:
        remote = StreamingLoader("memory://condmoe-test/val-{000000..000001}.tar", "val", 36, seed=4)
        assert [s.samples for s in remote.shards] == [100, 80]
        expected = read_epoch(StreamingLoader(digits_dir, "val", 36, seed=4))
        assert read_epoch(remote) == expected
        for name in ("manifest.parquet", *[r.shard for r in read_manifest(digits_dir).split("train")]):
            fs.pipe(f"/condmoe-test/{name}", (digits_dir / name).read_bytes())
        folder_url = StreamingLoader("memory://condmoe-test", "train", 50, seed=4)  # manifest read remotely
        assert folder_url.mean == read_manifest(digits_dir).meta["mean"]
        assert read_epoch(folder_url) == read_epoch(StreamingLoader(digits_dir, "train", 50, seed=4))
        as_file_url = StreamingLoader(f"file://{digits_dir}/val-{{000000..000001}}.tar", "val", 36, seed=4)
        assert read_epoch(as_file_url) == expected
    finally:
        fs.rm("/condmoe-test", recursive=True)
