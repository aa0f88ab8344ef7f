"""Writing shards: every source round-trips through write -> verify -> StreamingLoader unchanged."""

from __future__ import annotations

import filecmp
import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from ds_helpers import denormalise
from PIL import Image

from condmoe.datasets import StreamingLoader, read_manifest, verify_shards, write_shards
from condmoe.datasets.idx import load_digits_images, load_fashion_mnist


def _read_all(folder: Path, split: str, batch_size: int) -> dict[str, tuple[np.ndarray, int]]:
    """Every sample of a split (batch_size must divide its size) as key -> (uint8 (H, W, C), label)."""
    loader = StreamingLoader(folder, split, batch_size)
    out: dict[str, tuple[np.ndarray, int]] = {}
    for batch in loader:
        imgs = denormalise(batch.images, loader)
        for key, img, label in zip(batch.keys, imgs, batch.labels.tolist()):
            assert key not in out
            out[key] = (img, label)
    assert len(out) == loader.num_samples
    return out


def test_fashion_mnist_slice_round_trips(fmnist_dir):
    report = verify_shards(fmnist_dir)
    assert report.ok and report.checked == 5 + 1 + 5 and report.samples == 1200
    tr_x, tr_y = load_fashion_mnist("train", limit=600)
    te_x, te_y = load_fashion_mnist("test", limit=600)
    got = {**_read_all(fmnist_dir, "train", 60), **_read_all(fmnist_dir, "val", 60), **_read_all(fmnist_dir, "test", 100)}
    assert len(got) == 1200
    for key, (img, label) in got.items():
        split, idx = key.split("_")
        x, y = (tr_x, tr_y) if split == "train" else (te_x, te_y)
        assert label == y[int(idx)], key
        np.testing.assert_array_equal(img[:, :, 0], x[int(idx)], err_msg=key)
    man = read_manifest(fmnist_dir)
    assert man.meta["classes"][9] == "ankle-boot" and man.meta["channels"] == 1
    loader = StreamingLoader(fmnist_dir, "test", 100)
    assert loader.image_shape == (1, 28, 28) and loader.classes == man.meta["classes"]
    assert 0.2 < man.meta["mean"][0] < 0.4 and 0.25 < man.meta["std"][0] < 0.45


def test_digits_round_trip_and_manifest(digits_dir):
    assert verify_shards(digits_dir).ok
    x, y = load_digits_images()
    got = {**_read_all(digits_dir, "train", 37), **_read_all(digits_dir, "val", 36), **_read_all(digits_dir, "test", 359)}
    assert sorted(int(k.split("_")[1]) for k in got) == list(range(len(x)))
    for key, (img, label) in got.items():
        i = int(key.split("_")[1])
        assert label == y[i]
        np.testing.assert_array_equal(img[:, :, 0], x[i])
    man = read_manifest(digits_dir)
    # val and test are class-stratified: each class gives its share (within one sample)
    every = np.bincount(y, minlength=10)
    for split, frac in (("val", 0.1), ("test", 0.2)):
        counts = np.sum([r.class_counts for r in man.split(split)], axis=0)
        assert np.all(np.abs(counts - frac * every) <= 1.5), (split, counts)
    train = man.split("train")
    assert [r.samples for r in train] == [100] * 12 + [58]
    assert [r.shard for r in train] == [f"train-{i:06d}.tar" for i in range(13)]
    for r in man.shards:
        path = digits_dir / r.shard
        assert r.bytes == path.stat().st_size
        assert r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sum(r.class_counts) == r.samples
        with tarfile.open(path) as tf:
            names = tf.getnames()
            assert all(m.mtime == tf.getmembers()[0].mtime for m in tf.getmembers())
        # each sample's members are stored together: KEY.cls then KEY.png
        assert [n.rsplit(".", 1)[0] for n in names[0::2]] == [n.rsplit(".", 1)[0] for n in names[1::2]]
        assert names[0] == f"{r.first_key}.cls"


def test_same_input_gives_byte_identical_shards(tmp_path):
    a = write_shards("synthetic:n=300,size=12,channels=3,classes=4", tmp_path / "a", samples_per_shard=64, seed=3)
    b = write_shards("synthetic:n=300,size=12,channels=3,classes=4", tmp_path / "b", samples_per_shard=64, seed=3)
    c = write_shards("synthetic:n=300,size=12,channels=3,classes=4", tmp_path / "c", samples_per_shard=64, seed=4)
    tars = sorted(p.name for p in a.glob("*.tar"))
    assert tars and tars == sorted(p.name for p in b.glob("*.tar"))
    match, mismatch, errors = filecmp.cmpfiles(a, b, tars, shallow=False)
    assert match == tars and not mismatch and not errors
    assert (a / "train-000000.tar").read_bytes() != (c / "train-000000.tar").read_bytes()


def test_synthetic_source_is_class_conditional(tmp_path):
    d = write_shards("synthetic:n=400,size=16,channels=3,classes=4", tmp_path / "s", samples_per_shard=50,
                     val_fraction=0.0, test_fraction=0.0)
    loader = StreamingLoader(d, "train", 100, shuffle=False)
    batches = list(loader)
    x = np.concatenate([b.images.numpy() for b in batches])
    y = np.concatenate([b.labels.numpy() for b in batches])
    assert x.shape == (400, 3, 16, 16)
    counts = np.bincount(y, minlength=4)
    man = read_manifest(d)
    assert counts.tolist() == np.sum([r.class_counts for r in man.split("train")], axis=0).tolist()
    # class means differ far more than noise: a nearest-class-mean classifier is nearly perfect
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    pred = np.argmin(((x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)
    assert (pred == y).mean() > 0.9


def _image_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((10, 10, 3), 40 * c, np.uint8) + rng.integers(0, 30, (10, 10, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def test_imagefolder_source(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    d = write_shards(f"imagefolder:{root}", tmp_path / "s", samples_per_shard=4, val_fraction=0.0,
                     test_fraction=1 / 3, image_size=8)
    man = read_manifest(d)
    assert man.meta["classes"] == ["cat", "dog", "emu"] and (man.meta["height"], man.meta["width"]) == (8, 8)
    assert sum(r.samples for r in man.split("train")) == 12 and sum(r.samples for r in man.split("test")) == 6
    loader = StreamingLoader(d, "train", 12)
    (batch,) = list(loader)
    assert batch.images.shape == (12, 3, 8, 8)
    for key, label in zip(batch.keys, batch.labels.tolist()):
        assert key.split("_")[1] == ["cat", "dog", "emu"][label]


def test_failed_write_leaves_nothing_and_existing_output_is_kept(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "dog" / "002.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="002.png"):
        write_shards(f"imagefolder:{root}", tmp_path / "out", samples_per_shard=4, val_fraction=0.0,
                     test_fraction=0.0, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no out/, no .out.partial-*
    done = write_shards("digits", tmp_path / "d", samples_per_shard=500, limit=200)
    with pytest.raises(ValueError, match="not empty"):
        write_shards("digits", done, samples_per_shard=100, limit=200)
    assert verify_shards(done).ok and len(read_manifest(done).shards) == 3  # one shard per split
    write_shards("digits", done, samples_per_shard=50, limit=200, overwrite=True)
    assert max(r.samples for r in read_manifest(done).shards) == 50 and verify_shards(done).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "imgs"]
    # a writer killed mid-way leaves a partial folder: never read as a set, cleaned by the next write
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".e.partial-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"half")
    with pytest.raises(FileNotFoundError):
        StreamingLoader(tmp_path / "e", "train", 4)
    write_shards("digits", tmp_path / "e", samples_per_shard=100, limit=50)
    assert not stale.exists() and verify_shards(tmp_path / "e").ok


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "digits", "samples_per_shard": 0}, "samples_per_shard must be >= 1, got 0"),
    ({"source": "mnist", "samples_per_shard": 10}, "unknown source 'mnist'"),
    ({"source": "digits", "samples_per_shard": 10, "val_fraction": 1.5}, "val_fraction must be in"),
    ({"source": "synthetic:n=10,colour=3", "samples_per_shard": 10}, "unknown synthetic option"),
    ({"source": "fashion_mnist:/nonexistent", "samples_per_shard": 10}, "/nonexistent"),
])
def test_bad_write_arguments_name_the_value(tmp_path, kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        write_shards(out_dir=tmp_path / "x", **kwargs)
