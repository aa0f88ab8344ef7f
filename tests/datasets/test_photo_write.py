"""The photo path's writer: original bytes kept, ImageNet's train/val layout, other tools' shards as a source."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from condmoe.cluster.cli import main
from condmoe.datasets import StreamingLoader, read_manifest, verify_shards, write_shards
from condmoe.datasets.photos import make_photo_folder
from condmoe.datasets.shardio import read_shard


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _members(folder: Path, split: str) -> dict[str, tuple[str, bytes, int]]:
    """key -> (image ext, image bytes, label) of every sample of a split."""
    out = {}
    for row in read_manifest(folder).split(split):
        for key, parts in read_shard(str(folder / row.shard)).samples.values():
            ext = next(e for e in ("jpg", "png") if e in parts)
            out[key] = (ext, parts[ext], int(parts["cls"]))
    return out


def test_imagenet_layout_keeps_original_bytes_and_splits(photo_folder, photo_shards):
    man = read_manifest(photo_shards)
    assert man.splits == ["train", "val"]
    assert man.meta["classes"] == [f"n{c:08d}" for c in range(4)]
    assert man.meta["encoded"] == "original" and man.meta["image_ext"] == "jpg,png"
    assert man.meta["height"] is None and man.meta["width"] is None  # sizes vary: the reader needs a resolution
    assert man.meta["mean"] == [0.485, 0.456, 0.406] and man.meta["channels"] == 3
    assert [r.samples for r in man.split("train")] == [32] * 5 and [r.samples for r in man.split("val")] == [32, 8]
    assert verify_shards(photo_shards).ok
    for split, per_class in (("train", 40), ("val", 10)):
        files = {p for p in (photo_folder / split).rglob("*") if p.is_file()}
        members = _members(photo_shards, split)
        assert len(members) == len(files) == 4 * per_class
        by_key = {"img_" + "_".join(p.relative_to(photo_folder).with_suffix("").parts): p for p in files}
        assert set(by_key) == set(members)
        for key, (ext, data, label) in members.items():
            src = by_key[key]
            assert _sha(data) == _sha(src.read_bytes())  # byte for byte: JPEG stays the same JPEG
            assert ext == ("png" if src.suffix == ".png" else "jpg")
            assert label == int(src.parent.name[1:])
        counts = np.sum([r.class_counts for r in man.split(split)], axis=0)
        assert counts.tolist() == [per_class] * 4


def test_flat_folder_is_cut_by_fractions_and_writes_are_reproducible(tmp_path):
    root = make_photo_folder(tmp_path / "flat", classes=3, per_class=20, min_side=24, max_side=48, seed=1)
    a = write_shards(f"imagefolder:{root}", tmp_path / "a", samples_per_shard=16, val_fraction=0.2,
                     test_fraction=0.1, seed=4)
    b = write_shards(f"imagefolder:{root}", tmp_path / "b", samples_per_shard=16, val_fraction=0.2,
                     test_fraction=0.1, seed=4)
    man = read_manifest(a)
    sizes = {s: sum(r.samples for r in man.split(s)) for s in man.splits}
    assert sizes == {"train": 42, "val": 12, "test": 6}
    assert [r.sha256 for r in man.shards] == [r.sha256 for r in read_manifest(b).shards]


def test_shorter_side_shrinks_only_large_images(tmp_path):
    root = make_photo_folder(tmp_path / "big", classes=2, per_class=8, min_side=30, max_side=90, seed=2)
    out = write_shards(f"imagefolder:{root}", tmp_path / "s", samples_per_shard=64, val_fraction=0.0,
                       test_fraction=0.0, shorter_side=60, jpeg_quality=85)
    assert read_manifest(out).meta["shorter_side"] == 60
    files = {"img_" + "_".join(p.relative_to(root).with_suffix("").parts): p for p in root.rglob("*.jpg")}
    kept = shrunk = 0
    for key, (ext, data, _) in _members(out, "train").items():
        original = Image.open(files[key])
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG"
            if min(original.size) <= 60:
                assert data == files[key].read_bytes()
                kept += 1
            else:
                assert min(im.size) == 60
                assert abs(im.size[0] / im.size[1] - original.size[0] / original.size[1]) < 0.05
                shrunk += 1
    assert kept and shrunk


def _foreign_shards(folder: Path, photo_folder: Path) -> dict[str, bytes]:
    """Shards like other tools write them (webdataset.ShardWriter): train as .jpg bytes, val as .png arrays."""
    originals = {}
    folder.mkdir()
    for split, pattern, maxcount in (("train", "imagenet-train-%04d.tar", 50), ("val", "imagenet-val-%04d.tar", 64)):
        with wds.ShardWriter(str(folder / pattern), maxcount=maxcount, verbose=0) as sink:
            for i, p in enumerate(sorted((photo_folder / split).rglob("*.JPEG"))):
                key = f"{split}_{i:05d}"
                label = int(p.parent.name[1:])
                if split == "train":
                    sink.write({"__key__": key, "jpg": p.read_bytes(), "cls": label})
                    originals[key] = p.read_bytes()
                else:
                    sink.write({"__key__": key, "png": np.asarray(Image.open(p).convert("RGB")), "cls": label})
    return originals


def test_webdataset_shards_of_other_tools_are_a_source(photo_folder, tmp_path):
    originals = _foreign_shards(tmp_path / "foreign", photo_folder)
    out = write_shards(f"webdataset:{tmp_path / 'foreign'}", tmp_path / "s", samples_per_shard=40)
    man = read_manifest(out)
    assert man.splits == ["train", "val"] and man.meta["classes"] == ["0", "1", "2", "3"]
    train = _members(out, "train")
    assert len(train) == len(originals) and all(_sha(train[k][1]) == _sha(v) for k, v in originals.items())
    val = _members(out, "val")
    assert len(val) == len(list((photo_folder / "val").rglob("*.JPEG"))) and {e for e, _, _ in val.values()} == {"png"}
    assert verify_shards(out).ok
    # a pattern is one pool, cut by seeded class-stratified fractions; a bad spec names itself
    pooled = write_shards(f"webdataset:{tmp_path}/foreign/imagenet-train-{{0000..0001}}.tar", tmp_path / "p",
                          samples_per_shard=50, val_fraction=0.25, test_fraction=0.0)  # 2 x 50 samples
    sizes = {s: sum(r.samples for r in read_manifest(pooled).split(s)) for s in read_manifest(pooled).splits}
    assert sizes == {"train": 75, "val": 25}
    with pytest.raises(ValueError, match="holds no .tar"):
        write_shards(f"webdataset:{photo_folder}", tmp_path / "x", samples_per_shard=4)


def test_reader_streams_foreign_shards_without_a_manifest(photo_folder, tmp_path):
    _foreign_shards(tmp_path / "foreign", photo_folder)
    ld = StreamingLoader(f"{tmp_path}/foreign/imagenet-train-{{0000..0001}}.tar", "train", 16, resolution=32,
                         augment=True, seed=1)
    assert ld.image_shape == (3, 32, 32) and ld.hflip and ld.mean == [0.485, 0.456, 0.406]
    n = 0
    for batch in ld:
        assert batch.images.shape == (16, 3, 32, 32)
        n += len(batch)
    assert [s.samples for s in ld.shards] == [50, 50] and n == 96 and not ld.bad_samples


def test_cli_writes_and_inspects_a_photo_folder(photo_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["shards", "write", "--source", f"imagefolder:{photo_folder}", "--out", str(out),
               "--samples-per-shard", "64", "--shorter-side", "64", "--no-progress"])
    assert rc == 0 and "wrote 200 samples" in capsys.readouterr().out
    assert read_manifest(out).meta["shorter_side"] == 64
    assert main(["shards", "verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["shards", "inspect", str(out)]) == 0
    assert "3xanyxany" in capsys.readouterr().out
