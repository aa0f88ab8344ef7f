"""The photo path's reader: per-sample decode + RandomResizedCrop/flip or resize + centre crop at a resolution,
seeded by (seed, epoch, position): exact across resume, ranks and loader workers."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from ds_helpers import expected_keys
from PIL import Image

from condmoe.datasets import StreamingLoader, read_manifest, write_shards
from condmoe.datasets.imaging import (IMAGENET_MEAN, IMAGENET_STD, center_box, have_simplejpeg, rrc_box, sample_rng,
                                      transform_sample)
from condmoe.datasets.shardio import read_shard

RES = 40


def _sample_bytes(folder) -> dict[str, tuple[str, bytes]]:
    out = {}
    for row in read_manifest(folder).shards:
        for key, parts in read_shard(str(folder / row.shard)).samples.values():
            ext = next(e for e in ("jpg", "png") if e in parts)
            out[key] = (ext, parts[ext])
    return out


def _run(folder, world: int, batch: int, *, workers: int = 0, state: dict | None = None, stop: int | None = None,
         epoch: int = 0, augment: bool = True):
    """Every rank for ``stop`` steps (or the epoch): per-rank keys and images, and the saved state."""
    keys, images, states = [], [], []
    for r in range(world):
        ld = StreamingLoader(folder, "train", batch, rank=r, world_size=world, num_workers=workers, seed=11,
                             augment=augment, resolution=RES)
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
        ld.set_epoch(epoch if state is None else state["epoch"])
        k, im = [], []
        for n, b in enumerate(ld, 1):
            assert b.images.shape == (batch, 3, RES, RES) and b.images.dtype == torch.float32
            k += b.keys
            im.append(b.images)
            if stop is not None and n == stop:
                break
        keys.append(k)
        images.append(torch.cat(im) if im else torch.zeros(0, 3, RES, RES))
        states.append(ld.state_dict())
    assert all(s == states[0] for s in states)
    return keys, images, states[0]


@pytest.mark.parametrize("augment", [True, False])
def test_batches_are_the_normalised_per_sample_transform(photo_shards, augment):
    ld = StreamingLoader(photo_shards, "train", 16, seed=11, augment=augment, resolution=RES)
    assert ld.mean == IMAGENET_MEAN and ld.std == IMAGENET_STD and ld.image_shape == (3, RES, RES)
    position = {k: p for p, k in enumerate(expected_keys(ld))}
    raw = _sample_bytes(photo_shards)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    n = 0
    for batch in ld:
        for key, img in zip(batch.keys, batch.images):
            ext, data = raw[key]
            ref = transform_sample(data, ext, resolution=RES, channels=3, train=augment,
                                   rng=sample_rng(11, 0, position[key]), decoder=ld.decoder)
            want = torch.from_numpy(np.ascontiguousarray(ref)).permute(2, 0, 1).float().div_(255.0).sub_(mean).div_(std)
            torch.testing.assert_close(img, want, rtol=0, atol=0)
            n += 1
    assert n == 160
    if not augment:  # the eval transform is a pure function of the image: another seed changes nothing
        again = StreamingLoader(photo_shards, "train", 16, seed=12, resolution=RES, shuffle=False)
        first = next(iter(again))
        ext, data = raw[first.keys[0]]
        ref = transform_sample(data, ext, resolution=RES, channels=3, train=False, rng=None, decoder=ld.decoder)
        np.testing.assert_array_equal(ref, transform_sample(data, ext, resolution=RES, channels=3, train=False,
                                                            rng=sample_rng(99, 9, 9), decoder=ld.decoder))


@pytest.mark.multiproc
def test_resume_and_any_topology_give_identical_pixels_exactly_once(photo_shards):
    full_keys, full_imgs, _ = _run(photo_shards, 1, 16)
    assert len(full_keys[0]) == 160 and len(set(full_keys[0])) == 160
    pixels = dict(zip(full_keys[0], full_imgs[0]))
    # stop mid-epoch (inside the second shard window), resume from the saved state: identical batches
    before, imgs_a, state = _run(photo_shards, 1, 16, stop=3)
    assert state["position"] == 48
    after, imgs_b, _ = _run(photo_shards, 1, 16, state=state)
    assert before[0] + after[0] == full_keys[0]
    torch.testing.assert_close(torch.cat([imgs_a[0], imgs_b[0]]), full_imgs[0], rtol=0, atol=0)
    # two ranks with two loader workers each, resumed on one rank part-way: every sample once, same pixels
    two_keys, two_imgs, state2 = _run(photo_shards, 2, 8, workers=2, stop=4)
    rest_keys, rest_imgs, _ = _run(photo_shards, 1, 8, workers=1, state=state2)
    seen = [k for ks in two_keys + rest_keys for k in ks]
    assert len(seen) == len(set(seen)) == 160 and not any("#" in k for k in seen)
    for ks, ims in zip(two_keys + rest_keys, two_imgs + rest_imgs):
        for k, im in zip(ks, ims):
            torch.testing.assert_close(im, pixels[k], rtol=0, atol=0)
    # the next epoch draws new crops for the same images
    next_keys, next_imgs, _ = _run(photo_shards, 1, 16, epoch=1, stop=2)
    assert all(not torch.equal(im, pixels[k]) for k, im in zip(next_keys[0], next_imgs[0]))


def _pil_reference_eval(data: bytes, res: int, dx: int = 0) -> np.ndarray:
    """Resize (shorter side to round(res / 0.875), bilinear) then centre crop, written the plain Pillow way."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    r = int(round(res / 0.875))
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    im = im.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - res) / 2.0)) + dx, int(round((size[1] - res) / 2.0))
    return np.asarray(im.crop((left, top, left + res, top + res)))


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_eval_transform_is_resize_and_centre_crop(photo_shards, decoder):
    if decoder == "simplejpeg" and not have_simplejpeg():
        pytest.skip("simplejpeg not installed")
    diffs, shifted = [], []
    for key, (ext, data) in list(_sample_bytes(photo_shards).items())[:60]:
        out = transform_sample(data, ext, resolution=RES, channels=3, train=False, rng=None, decoder=decoder)
        assert out.shape == (RES, RES, 3) and out.dtype == np.uint8
        diffs.append(np.abs(out.astype(np.int16) - _pil_reference_eval(data, RES)).mean())
        shifted.append(np.abs(out.astype(np.int16) - _pil_reference_eval(data, RES, dx=3)).mean())
    # same geometry as the two-step reference (one resize of the box instead of two steps; DCT-scaled decode)
    assert np.mean(diffs) < 2.5 and max(diffs) < 6, (np.mean(diffs), max(diffs))
    assert np.mean(diffs) < 0.5 * np.mean(shifted)  # a crop 3 px off is clearly worse


def test_random_resized_crop_boxes_follow_the_recipe():
    rng = np.random.default_rng(0)
    boxes = np.array([rrc_box(rng, 300, 200) for _ in range(3000)], dtype=np.float64)
    x, y, w, h = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 300).all() and (y + h <= 200).all()
    area = w * h / (300 * 200)
    assert area.min() >= 0.08 * 0.95 and area.max() <= 1.0 and 0.3 < np.median(area) < 0.6
    ratio = w / h
    assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= 4 / 3 * 1.03
    assert rrc_box(np.random.default_rng(0), 1000, 10) == (493, 0, 13, 10)  # no try fits: centred 4/3 crop
    # 200x100 at 56: resize to 128x64 (shorter side round(56 / 0.875) = 64), crop 56 at (36, 4)
    assert center_box(200, 100, 56) == pytest.approx((36 * 200 / 128, 4 * 100 / 64, 56 * 200 / 128, 56 * 100 / 64))


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_train_transform_is_the_crop_resized_and_flipped(photo_shards, decoder):
    """Against Pillow's crop + resize of the full decode: the box edges are whole pixels of the (DCT-scaled)
    decode, so the output may sit a fraction of a pixel off; a box one output pixel off is clearly worse."""
    if decoder == "simplejpeg" and not have_simplejpeg():
        pytest.skip("simplejpeg not installed")
    flips, diffs, shifted, diffs_moved = 0, [], [], []
    for key, (ext, data) in list(_sample_bytes(photo_shards).items())[:60]:
        out = transform_sample(data, ext, resolution=RES, channels=3, train=True, rng=sample_rng(3, 0, len(key)),
                               decoder=decoder)
        im = Image.open(io.BytesIO(data)).convert("RGB")
        check = sample_rng(3, 0, len(key))
        x, y, w, h = rrc_box(check, *im.size)
        flip = check.random() < 0.5
        W, H = im.size
        moves = [(0, 0)] + [m for m in ((w / RES, 0), (-w / RES, 0), (0, h / RES), (0, -h / RES))
                            if 0 <= x + m[0] and x + m[0] + w <= W and 0 <= y + m[1] and y + m[1] + h <= H][:1]
        refs = []
        for dx, dy in moves:  # the box itself, then the box moved by one output pixel where it fits
            ref = np.asarray(im.resize((RES, RES), Image.Resampling.BILINEAR, box=(x + dx, y + dy, x + dx + w, y + dy + h)))
            refs.append(np.abs(out.astype(np.int16) - (ref[:, ::-1] if flip else ref)).mean())
        diffs.append(refs[0])
        if len(refs) == 2:
            shifted.append(refs[1])
            diffs_moved.append(refs[0])
        flips += flip
        no_flip = transform_sample(data, ext, resolution=RES, channels=3, train=True, hflip=False,
                                   rng=sample_rng(3, 0, len(key)), decoder=decoder)
        np.testing.assert_array_equal(out, no_flip[:, ::-1] if flip else no_flip)
    assert np.mean(diffs) < 2.5 and max(diffs) < 8, (np.mean(diffs), max(diffs))
    assert len(shifted) > 30 and np.mean(diffs_moved) < 0.6 * np.mean(shifted), (np.mean(diffs_moved), np.mean(shifted))
    assert 10 < flips < 50


def test_decoders_agree_and_are_deterministic(photo_shards):
    if not have_simplejpeg():
        pytest.skip("simplejpeg not installed")
    diffs = []
    for key, (ext, data) in list(_sample_bytes(photo_shards).items())[:30]:
        outs = {d: [transform_sample(data, ext, resolution=RES, channels=3, train=True, rng=sample_rng(1, 2, 3),
                                     decoder=d) for _ in range(2)] for d in ("pil", "simplejpeg")}
        for a, b in outs.values():
            np.testing.assert_array_equal(a, b)
        diffs.append(np.abs(outs["pil"][0].astype(np.int16) - outs["simplejpeg"][0]).mean())
    # the two pick different DCT scales (Pillow's draft: 1/2, 1/4, 1/8; libjpeg-turbo: any M/8)
    assert np.mean(diffs) < 2.5 and max(diffs) < 8, (np.mean(diffs), max(diffs))


def test_resolution_is_required_for_varying_sizes_and_gray_sets_give_one_channel(photo_folder, photo_shards, tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        StreamingLoader(photo_shards, "train", 8)
    gray = write_shards(f"imagefolder:{photo_folder}", tmp_path / "gray", samples_per_shard=100, channels=1)
    ld = StreamingLoader(gray, "val", 8, resolution=24, augment=True)
    assert ld.mean == [pytest.approx(sum(IMAGENET_MEAN) / 3, abs=1e-6)]
    batch = next(iter(ld))
    assert batch.images.shape == (8, 1, 24, 24)


def test_one_size_folder_reads_as_stored_and_bad_jpegs_are_counted(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
            data = buf.getvalue()
            (root / f"c{c}" / f"{i}.jpg").write_bytes(data[: len(data) * 2 // 3] if (c, i) == (1, 5) else data)
    out = write_shards(f"imagefolder:{root}", tmp_path / "s", samples_per_shard=24, val_fraction=0.0,
                       test_fraction=0.0)  # a truncated JPEG has a valid header: the writer keeps it
    meta = read_manifest(out).meta
    assert (meta["height"], meta["width"]) == (48, 48)
    as_stored = StreamingLoader(out, "train", 24)  # one size for all: the fixed-size path works too
    assert next(iter(as_stored)).images.shape == (24, 3, 48, 48)
    for decoder in ("pil", "auto"):
        ld = StreamingLoader(out, "train", 24, resolution=16, augment=True, decoder=decoder)
        batch = next(iter(ld))
        assert ld.bad_samples == {"bad_image": 1} and sum("#fill" in k for k in batch.keys) == 1
        assert math.isfinite(batch.images.sum().item())
