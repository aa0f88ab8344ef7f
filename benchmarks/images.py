"""Decode + augment throughput of the photo path at 224x224 (CPU), against the plain Pillow way.

Photo-like JPEGs of ImageNet's typical size (shorter side 300-500 px, quality 90; made by
condmoe.datasets.photos, nothing downloaded) are written as shards with their original
bytes, plus a smaller set of camera-size ones (shorter side 1000-1500 px), where decoding at
a reduced DCT scale matters most. Then, in the same run and on the same bytes:

- per process (one thread): the training transform (RandomResizedCrop scale 0.08-1, ratio
  3/4-4/3, h-flip, ImageNet normalisation to a float (3, 224, 224) tensor) and the evaluation
  transform (resize to 256 + centre crop 224), each three ways: "simple" = Pillow decode of
  the full image, crop, resize, flip, to tensor, normalise (the way one writes it without
  thinking about speed); condmoe's path (box drawn from the header, DCT-scaled decode, one
  antialiased uint8 resize) with Pillow (``Image.draft``) and with simplejpeg decoding;
- through loader worker processes 0, 1, 2 (ImageNet-size set): condmoe's StreamingLoader
  (``resolution=224``, batch 64) against the simple transform in a torch DataLoader over the
  same samples.

Per-process rates are samples per second of this process's CPU time (other jobs on a shared
machine change wall time far more); loader rates are wall time of one epoch, worker start-up
included. Rounds alternate the ways; the tables give each one's median round. Prints tables
and writes JSON to benchmarks/results/images.json.

    python benchmarks/images.py [--images 384] [--large-images 48] [--rounds 3] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from condmoe.datasets import StreamingLoader, read_manifest, write_shards
from condmoe.datasets.imaging import IMAGENET_MEAN, IMAGENET_STD, have_simplejpeg, sample_rng, transform_sample
from condmoe.datasets.photos import make_photo_folder
from condmoe.datasets.shardio import read_shard

RES = 224
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float (3, H, W), as the loader's collate does it."""
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(255.0).sub_(MEAN).div_(STD)


def simple_train(data: bytes, rnd: random.Random) -> torch.Tensor:
    """RandomResizedCrop + flip written the simple way: decode everything, then crop and resize."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = im.size
    for _ in range(10):
        area = width * height * rnd.uniform(0.08, 1.0)
        aspect = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x, y = rnd.randint(0, width - w), rnd.randint(0, height - h)
            break
    else:
        x, y, w, h = 0, 0, width, height
    im = im.crop((x, y, x + w, y + h)).resize((RES, RES), Image.Resampling.BILINEAR)
    if rnd.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor(np.asarray(im))


def simple_eval(data: bytes) -> torch.Tensor:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    r = int(round(RES / 0.875))
    im = im.resize((r, int(r * h / w)) if w <= h else (int(r * w / h), r), Image.Resampling.BILINEAR)
    left, top = (im.size[0] - RES) // 2, (im.size[1] - RES) // 2
    return _to_tensor(np.asarray(im.crop((left, top, left + RES, top + RES))))


def per_process(samples: list[bytes], way: str, train: bool) -> float:
    """Samples per CPU-second of one transform over all samples in this process."""
    rnd = random.Random(0)
    start = time.process_time()
    for i, data in enumerate(samples):
        if way == "simple":
            simple_train(data, rnd) if train else simple_eval(data)
        else:
            _to_tensor(transform_sample(data, "jpg", resolution=RES, channels=3, train=train,
                                        rng=sample_rng(0, 0, i) if train else None, decoder=way))
    return len(samples) / (time.process_time() - start)


class _SimpleSet(Dataset):
    """The simple training transform as a map-style dataset (torch DataLoader batches it)."""

    def __init__(self, samples: list[bytes]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        return simple_train(self.samples[i], random.Random(i))


def loader_rate(kind: str, shards: Path, samples: list[bytes], workers: int, batch: int) -> float:
    """Samples/s of one epoch (worker start-up included) through ``workers`` loader processes."""
    start = time.perf_counter()
    n = 0
    if kind == "condmoe":
        for b in StreamingLoader(shards, "train", batch, num_workers=workers, seed=0, augment=True, resolution=RES):
            n += len(b)
    else:
        for x in DataLoader(_SimpleSet(samples), batch_size=batch, num_workers=workers, drop_last=True):
            n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384, help="photo-like JPEGs to make (4 classes)")
    ap.add_argument("--min-side", type=int, default=300)
    ap.add_argument("--max-side", type=int, default=500)
    ap.add_argument("--large-images", type=int, default=48, help="camera-size JPEGs (shorter side 1000-1500)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "images.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    decoders = ["pil"] + (["simplejpeg"] if have_simplejpeg() else [])
    tmp = Path(tempfile.mkdtemp(prefix="condmoe-bench-images-"))
    try:
        t0 = time.perf_counter()
        folder = make_photo_folder(tmp / "photos", classes=4, per_class=args.images // 4, min_side=args.min_side,
                                   max_side=args.max_side, quality=90, seed=0)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        shards = write_shards(f"imagefolder:{folder}", tmp / "shards", samples_per_shard=64, val_fraction=0.0,
                              test_fraction=0.0)
        write_s = time.perf_counter() - t0
        man = read_manifest(shards)
        samples = [parts["jpg"] for r in man.split("train")
                   for _, parts in read_shard(str(shards / r.shard)).samples.values()]
        sizes = [Image.open(io.BytesIO(d)).size for d in samples]
        large_dir = make_photo_folder(tmp / "large", classes=4, per_class=max(1, args.large_images // 4),
                                      min_side=1000, max_side=1500, quality=90, seed=1)
        large = [p.read_bytes() for p in sorted(large_dir.rglob("*.jpg"))]
        large_sizes = [Image.open(io.BytesIO(d)).size for d in large]
        ways = ["simple"] + decoders
        sets = {"imagenet": samples, "camera": large}
        proc: dict[str, list[float]] = {f"{k}/{w}/{m}": [] for k in sets for w in ways for m in ("train", "eval")}
        load: dict[str, list[float]] = {f"{k}/{nw}": [] for k in ("simple", "condmoe") for nw in (0, 1, 2)}
        for _ in range(args.rounds):
            for k, data in sets.items():
                for w in ways:
                    for m in ("train", "eval"):
                        proc[f"{k}/{w}/{m}"].append(per_process(data, w, m == "train"))
            for nw in (0, 1, 2):
                for k in ("simple", "condmoe"):
                    load[f"{k}/{nw}"].append(loader_rate(k, shards, samples, nw, args.batch))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: round(statistics.median(v)) for k, v in {**proc, **load}.items()}
    mb = sum(len(d) for d in samples) / 1e6
    result = {
        "cpu_count": os.cpu_count(), "torch_threads": 1, "resolution": RES, "batch": args.batch, "rounds": args.rounds,
        "images": len(samples), "mean_width": round(float(np.mean([s[0] for s in sizes]))),
        "mean_height": round(float(np.mean([s[1] for s in sizes]))), "mean_kB": round(1000 * mb / len(samples), 1),
        "make_photos_s": round(made, 1), "write_samples_per_s": round(len(samples) / write_s),
        "large_images": len(large), "large_mean_width": round(float(np.mean([s[0] for s in large_sizes]))),
        "large_mean_height": round(float(np.mean([s[1] for s in large_sizes]))),
        "large_mean_kB": round(sum(len(d) for d in large) / len(large) / 1000, 1),
        "per_process_samples_per_s": {k: med[k] for k in proc}, "loader_samples_per_s": {k: med[k] for k in load},
        "rounds_raw": {k: [round(x) for x in v] for k, v in {**proc, **load}.items()},
    }
    print(f"{len(samples)} photo-like JPEGs, mean {result['mean_width']}x{result['mean_height']} px, "
          f"{result['mean_kB']} kB; shard write {result['write_samples_per_s']} samples/s (bytes kept, no decode)")
    print(f"camera-size set: {len(large)} JPEGs, mean {result['large_mean_width']}x{result['large_mean_height']} px, "
          f"{result['large_mean_kB']} kB")
    for k, title in (("imagenet", "ImageNet-size"), ("camera", "camera-size")):
        print(f"{title + ', per process (samples/CPU-s)':<44}{'train':>10}{'eval':>10}{'train/simple':>14}{'eval/simple':>13}")
        for w in ways:
            label = {"simple": "simple: Pillow full decode + crop + resize",
                     "pil": "condmoe, Pillow draft decode", "simplejpeg": "condmoe, simplejpeg decode"}[w]
            tr, ev = med[f"{k}/{w}/train"], med[f"{k}/{w}/eval"]
            print(f"{label:<44}{tr:>10}{ev:>10}{tr / med[f'{k}/simple/train']:>13.2f}x"
                  f"{ev / med[f'{k}/simple/eval']:>12.2f}x")
    print(f"{'ImageNet-size, train, batch ' + str(args.batch) + ' (samples/s)':<44}{'simple':>10}{'condmoe':>10}{'ratio':>14}")
    for nw in (0, 1, 2):
        s, c = med[f"simple/{nw}"], med[f"condmoe/{nw}"]
        print(f"{str(nw) + ' loader worker(s)':<44}{s:>10}{c:>10}{c / s:>13.2f}x")
    load_avg = os.getloadavg()[0]
    result["load_average_1min"] = round(load_avg, 2)
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_avg:.1f} at the end (other jobs share it)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
