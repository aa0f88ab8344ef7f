"""Write a source as WebDataset shards ``{split}-%06d.tar`` plus ``manifest.parquet``.

Each sample is two tar members stored next to each other, ``KEY.cls`` (the label as
ASCII digits) then ``KEY.png`` (the image, grayscale or RGB), the layout plain
``webdataset`` reads with ``.decode("pil")``. Sources that keep encoded bytes (photo
folders, other tools' shards) store the original file instead: ``KEY.jpg`` stays the
source's JPEG byte for byte. Every shard holds ``samples_per_shard``
samples except the last of each split, which holds the remainder (the manifest
records each count). Members carry a fixed mtime, uid/gid 0 and mode 0444, so the
same input gives byte-identical shards.

Publishing is atomic: shards and manifest go to a hidden ``.NAME.partial-PID``
folder beside ``out_dir`` that is renamed to ``out_dir`` only when complete, so a
killed writer never leaves something that looks like a complete set.

``out_dir`` may be an ``s3://bucket/prefix`` URL (object stores have no rename): the set
is written to a local temp folder first, then an existing set there loses its manifest
(so it is no longer complete), its objects are deleted, the shards are uploaded and the
manifest goes LAST. A reader never takes a half-uploaded set for a complete one: without
a manifest there is no set (:func:`condmoe.datasets.read_manifest`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .imaging import IMAGENET_MEAN, IMAGENET_STD
from .manifest import MANIFEST_NAME, ShardInfo, write_manifest
from .sources import SPLITS, Encoded, Source, open_source
from .urls import filesystem, is_s3

log = logging.getLogger(__name__)

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant makes the output reproducible


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of ``img``: uint8 (H, W) grayscale or (H, W, 3) RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tf: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = mtime
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "condmoe"
    tf.addfile(ti, io.BytesIO(data))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Stats:
    """Running per-channel sum and sum of squares of the train images (values 0..1)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.s = np.zeros(channels)
        self.ss = np.zeros(channels)

    def add(self, img: np.ndarray) -> None:
        x = img.reshape(-1, self.s.size).astype(np.float64) / 255.0
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)

    def mean_std(self) -> tuple[list[float], list[float]]:
        if self.n == 0:
            return [0.5] * self.s.size, [0.5] * self.s.size
        mean = self.s / self.n
        std = np.sqrt(np.maximum(self.ss / self.n - mean * mean, 1e-12))
        return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _write_split(src: Source, split: str, tmp: Path, samples_per_shard: int, mtime: int,
                 stats: _Stats | None, tick: Callable[[], None], seen: dict[str, set]) -> list[ShardInfo]:
    """Write one split; ``seen`` collects the encoded images' (height, width) and extensions."""
    rows: list[ShardInfo] = []
    k = len(src.classes)
    tf: tarfile.TarFile | None = None
    counts = [0] * k
    n_in, first, path = 0, "", Path()

    def close(tf: tarfile.TarFile) -> None:
        tf.close()
        rows.append(ShardInfo(split, path.name, n_in, path.stat().st_size, _sha256(path), tuple(counts), first))

    for key, img, label in src.splits[split].iterate():
        if not 0 <= label < k:
            raise ValueError(f"sample {key}: label {label} outside 0..{k - 1}")
        if tf is None or n_in == samples_per_shard:
            if tf is not None:
                close(tf)
            path = tmp / f"{split}-{len(rows):06d}.tar"
            tf = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            counts, n_in, first = [0] * k, 0, key
        _add_member(tf, f"{key}.cls", str(label).encode(), mtime)
        if isinstance(img, Encoded):
            _add_member(tf, f"{key}.{img.ext}", img.data, mtime)
            seen["sizes"].add((img.height, img.width))
            seen["exts"].add(img.ext)
        else:
            _add_member(tf, f"{key}.png", encode_png(img), mtime)
            if stats is not None:
                stats.add(img)
        counts[label] += 1
        n_in += 1
        tick()
    if tf is not None:
        close(tf)
    return rows


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out} exists and is not empty (pass overwrite=True / --overwrite)")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)


def _remote_files(url: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def _check_remote_empty(url: str, overwrite: bool) -> None:
    if _remote_files(url) and not overwrite:
        raise ValueError(f"output {url} is not empty (pass overwrite=True / --overwrite)")


def _publish_remote(local: Path, url: str, overwrite: bool) -> None:
    """Upload a finished local set to ``url``: an old set there is unmade first (manifest, then the
    rest), the new manifest is written last."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    _check_remote_empty(url, overwrite)
    manifest = f"{path}/{MANIFEST_NAME}"
    if fs.get_file_info(manifest).type == pafs.FileType.File:
        fs.delete_file(manifest)  # the old set is no longer complete before any of its shards changes
    for stale in _remote_files(url):
        fs.delete_file(stale)
    body = local / MANIFEST_NAME
    aside = local.parent / f"{MANIFEST_NAME}.last"
    os.rename(body, aside)  # upload everything but the manifest (several objects at once) ...
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    chunk_size=16 << 20, use_threads=True)
    with fs.open_output_stream(manifest) as f:  # ... then the manifest: the set is complete
        f.write(aside.read_bytes())
    log.info("uploaded %s to %s", local, url)


def _remove_stale_partials(out: Path) -> None:
    """Delete ``.NAME.partial-PID`` folders left by writers that were killed (their PID is gone)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                log.info("removing %s left by a killed writer", stale)
                shutil.rmtree(stale, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass


def write_shards(
    source: str, out_dir: str | Path, *, samples_per_shard: int, val_fraction: float = 0.1,
    test_fraction: float = 0.2, seed: int = 0, limit: int | None = None, image_size: int | None = None,
    channels: int | None = None, shorter_side: int | None = None, jpeg_quality: int = 90,
    overwrite: bool = False, mtime: int = FIXED_MTIME, progress: Callable[[int, int], None] | None = None,
) -> Path | str:
    """Write ``source`` (see :mod:`condmoe.datasets.sources`) as shards in ``out_dir`` (a folder or an
    ``s3://`` URL); return it.

    ``val_fraction`` of the train data becomes the val split (seeded); ``test_fraction``
    applies to sources without their own test split. ``limit`` caps each source split.
    Image folders and WebDataset sources keep each image's encoded bytes; ``image_size``
    decodes them to SIZE x SIZE instead, ``shorter_side`` shrinks only the larger ones
    (re-encoded at ``jpeg_quality``). ``progress(done, total)`` is called after every sample.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if is_s3(str(out_dir)):
        url = str(out_dir).rstrip("/")
        staging = Path(tempfile.mkdtemp(prefix="condmoe-shards-"))
        try:
            _check_remote_empty(url, overwrite)  # before the (long) writing
            local = write_shards(source, staging / "set", samples_per_shard=samples_per_shard,
                                 val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, limit=limit,
                                 image_size=image_size, channels=channels, shorter_side=shorter_side,
                                 jpeg_quality=jpeg_quality, mtime=mtime, progress=progress)
            _publish_remote(Path(local), url, overwrite)
        except (FileNotFoundError, ConnectionError):  # a missing source; one line already
            raise
        except OSError as exc:  # pyarrow's S3 errors are paragraphs: one line naming the URL
            raise ConnectionError(f"{url}: {' '.join(str(exc).split())[:300]}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return url
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} exists and is not empty (pass overwrite=True / --overwrite)")
    src = open_source(source, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                      limit=limit, image_size=image_size, channels=channels, shorter_side=shorter_side,
                      jpeg_quality=jpeg_quality)
    total = sum(s.n for s in src.splits.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    try:
        stats = _Stats(src.channels)
        seen: dict[str, set] = {"sizes": set(), "exts": set()}
        rows: list[ShardInfo] = []
        for split in SPLITS:
            if split in src.splits and src.splits[split].n > 0:
                rows += _write_split(src, split, tmp, samples_per_shard, mtime, stats if split == "train" else None,
                                     tick, seen)
        height, width = src.height, src.width
        if src.encoded:
            # one size for all (a CIFAR-like folder): the fixed-size reader path works; else None.
            # No decode at write time, so no statistics: torchvision's ImageNet mean/std
            height, width = next(iter(seen["sizes"])) if len(seen["sizes"]) == 1 else (None, None)
            mean = IMAGENET_MEAN if src.channels == 3 else [round(sum(IMAGENET_MEAN) / 3, 6)]
            std = IMAGENET_STD if src.channels == 3 else [round(sum(IMAGENET_STD) / 3, 6)]
        else:
            mean, std = stats.mean_std()
        meta = {
            "source": src.name, "classes": list(src.classes), "channels": src.channels,
            "height": height, "width": width, "mean": mean, "std": std, "hflip": src.hflip,
            "samples_per_shard": samples_per_shard, "seed": seed, "label_ext": "cls",
            "image_ext": ",".join(sorted(seen["exts"])) if src.encoded else "png",
            "encoded": "original" if src.encoded else "png",
        }
        if src.encoded and shorter_side is not None:
            meta["shorter_side"] = shorter_side
        write_manifest(tmp / MANIFEST_NAME, rows, meta)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d samples in %d shards to %s", done, len(rows), out)
    return out
