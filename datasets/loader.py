"""The public reader: :class:`StreamingLoader` (see :mod:`condmoe.datasets.stream` for the design)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .imaging import IMAGENET_MEAN, IMAGENET_STD, resolve_decoder
from .plan import carry_for_epoch, steps_in
from .stream import REMAINDER_MODES, STATE_VERSION, Batch, _EpochStream, resolve_shards

log = logging.getLogger(__name__)


class StreamingLoader:
    """Batches of one rank from WebDataset shards, deterministic and exactly resumable.

    Args:
        source: a shard folder holding ``manifest.parquet``, the manifest file, or a
            shard URL / brace pattern (local paths, ``pipe:``, anything webdataset opens).
        split: ``train``, ``val`` or ``test`` (used to pick shards from a manifest).
        batch_size: samples per batch on this rank.
        rank, world_size: this rank and the number of ranks.
        num_workers: torch DataLoader worker processes (0: read in this process).
        seed: the epoch order is a function of (seed, epoch) only.
        augment: random translations (and h-flips where the manifest allows them); with a
            ``resolution``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + h-flip per sample.
        resolution: decode and transform every image to ``resolution`` x ``resolution`` (the photo
            path: any image size, original JPEG bytes; without ``augment`` resize to
            ``round(res / 0.875)`` + centre crop). None: images as stored (all one size).
        decoder: JPEG decoder of the photo path: ``auto`` (simplejpeg when installed), ``simplejpeg``
            or ``pil`` (Pillow's reduced-size ``draft`` decode).
        hflip: flip augmentation allowed (default: the manifest's ``hflip``; shards without a
            manifest: True with a ``resolution`` (photos), else False).
        remainder: ``drop`` the samples that cannot fill a whole global batch at the end of an
            epoch, ``carry`` them to the front of the next epoch, or ``pad`` the last global
            batch (``Batch.valid`` False on the padding): every sample read once, for evaluation.
        shuffle: shuffle the shard order and the samples (off: manifest order).
        mix_shards: shards whose samples are shuffled together (a batch mixes this many shards,
            so class-sorted shards still give mixed batches; a worker holds their samples at once).
        mean, std: per-channel normalisation (default: the manifest's, which is the train statistics or,
            for encoded photo sets, ImageNet's; shards without a manifest: ImageNet's for RGB at a
            ``resolution``, else 0.5).
        mp_context: multiprocessing start method of the loader workers (default: torch's).
        pin_memory: yield batches in page-locked host memory (where CUDA is available), so a GPU
            worker copies them to the device without blocking; the loader workers' batches are
            pinned in the DataLoader's pinning thread.

    Iterating yields :class:`Batch` es: ``images`` float32 (B, C, H, W) (H = W = ``resolution`` when given), ``labels`` int64 (B,),
    ``keys``. ``len(loader)`` is the number of batches of the current epoch, the same on every
    rank. ``state_dict()`` after k batches, loaded into a new loader (any world size, batch size
    or workers), continues with exactly the samples not yet read.
    """

    def __init__(self, source: str | Path, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, augment: bool = False, remainder: str = "drop",
                 shuffle: bool = True, mix_shards: int = 4, mean: list[float] | None = None,
                 std: list[float] | None = None, resolution: int | None = None, decoder: str = "auto",
                 hflip: bool | None = None, prefetch_factor: int = 2, mp_context: str | None = None,
                 pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if remainder not in REMAINDER_MODES:
            raise ValueError(f"remainder must be one of {REMAINDER_MODES}, got {remainder!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if mix_shards < 1:
            raise ValueError(f"mix_shards must be >= 1, got {mix_shards}")
        if resolution is not None and resolution < 8:
            raise ValueError(f"resolution must be >= 8 (or None: images as stored), got {resolution}")
        self.resolution, self.decoder = resolution, resolve_decoder(decoder)
        self.source, self.split = str(source), split
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.seed, self.augment, self.remainder, self.shuffle = seed, augment, remainder, shuffle
        self.mix_shards = mix_shards
        self.prefetch_factor, self.mp_context = prefetch_factor, mp_context
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning needs CUDA
        self.shards, self.meta = resolve_shards(source, split)
        self.num_samples = sum(s.samples for s in self.shards)
        if self.num_samples < self.global_batch:
            raise ValueError(f"split {split!r} has {self.num_samples} samples, fewer than one global batch "
                             f"({world_size} ranks x {batch_size})")
        probed = bool(self.meta.get("probed"))  # shards without a manifest: geometry from the first image
        if resolution is None and (self.meta.get("height") is None or self.meta.get("width") is None):
            raise ValueError(f"{source} holds images of varying size (encoded photos): pass a resolution "
                             "(job field data.resolution) to decode and crop them")
        if resolution is not None and probed:
            self.meta["channels"] = 3  # photos: gray and CMYK JPEGs of a colour set decode to RGB
        ch = int(self.meta["channels"])
        photo_stats = resolution is not None and probed and ch == 3
        default_mean = IMAGENET_MEAN if photo_stats else [0.5] * ch
        default_std = IMAGENET_STD if photo_stats else [0.5] * ch
        self.mean = list(mean if mean is not None else self.meta.get("mean", default_mean))
        self.std = list(std if std is not None else self.meta.get("std", default_std))
        self.hflip = bool(self.meta.get("hflip", False)) if hflip is None else hflip
        if hflip is None and probed and resolution is not None:
            self.hflip = True
        if len(self.mean) != ch or len(self.std) != ch or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} / std {self.std} must have {ch} entries, std > 0")
        self.epoch, self.position, self.carry = 0, 0, 0
        self.bad_samples: dict[str, int] = {}

    @property
    def classes(self) -> list[str] | None:
        """Class names from the manifest (None for shard URLs without one)."""
        return self.meta.get("classes")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this loader yields."""
        if self.resolution is not None:
            return int(self.meta["channels"]), self.resolution, self.resolution
        return int(self.meta["channels"]), int(self.meta["height"]), int(self.meta["width"])

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch_length(self) -> int:
        """Samples in the current epoch's sequence (carry + the dataset)."""
        return self.carry + self.num_samples

    def __len__(self) -> int:
        """Batches per rank in the current epoch (equal on every rank)."""
        return steps_in(self.epoch_length, 0, self.global_batch, self.remainder == "pad")

    @property
    def batches_remaining(self) -> int:
        """Batches per rank still to come in the current epoch (after a resume, fewer than len())."""
        return steps_in(self.epoch_length, self.position, self.global_batch, self.remainder == "pad")

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its start; a no-op when already in ``epoch`` (keeps a resumed position)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch == self.epoch:
            return
        self.epoch, self.position = epoch, 0
        self.carry = carry_for_epoch(self.num_samples, epoch, self.global_batch) if self.remainder == "carry" else 0

    def state_dict(self) -> dict:
        """The reader position in global samples: small, JSON-serialisable, topology-independent."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "carry": self.carry,
                "seed": self.seed, "num_samples": self.num_samples, "shuffle": self.shuffle,
                "mix_shards": self.mix_shards}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly of another topology)."""
        for k in ("version", "epoch", "position", "carry", "seed", "num_samples"):
            if k not in state:
                raise ValueError(f"reader state lacks {k!r}: {state}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"reader state version {state['version']} unsupported (expected {STATE_VERSION})")
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"reader state is for {state['num_samples']} samples, this split has {self.num_samples}")
        theirs = (state["seed"], state.get("shuffle", True), state.get("mix_shards", self.mix_shards))
        if theirs != (self.seed, self.shuffle, self.mix_shards):
            raise ValueError(f"reader state has (seed, shuffle, mix_shards)={theirs}, this loader "
                             f"{(self.seed, self.shuffle, self.mix_shards)}: the epoch order would differ")
        length = state["carry"] + self.num_samples
        if not 0 <= state["position"] <= length or not 0 <= state["carry"] <= self.num_samples:
            raise ValueError(f"reader state position {state['position']} / carry {state['carry']} out of range")
        self.epoch, self.position, self.carry = int(state["epoch"]), int(state["position"]), int(state["carry"])

    def _snapshot(self) -> _EpochStream:
        m = self.meta
        return _EpochStream(self.shards, seed=self.seed, epoch=self.epoch, carry=self.carry, position=self.position,
                            rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                            shuffle=self.shuffle, mix_shards=self.mix_shards, augment=self.augment, hflip=self.hflip,
                            pad=self.remainder == "pad", channels=int(m["channels"]),
                            height=int(m["height"] or 0), width=int(m["width"] or 0),
                            mean=self.mean, std=self.std, resolution=self.resolution, decoder=self.decoder)

    def _advance(self) -> None:
        leftover = self.epoch_length - self.position
        self.epoch, self.position = self.epoch + 1, 0
        self.carry = leftover if self.remainder == "carry" else 0

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; when it is read to the end the loader moves to the next epoch.

        A state saved after an epoch's last batch yields an empty pass (and then moves on), so a
        trainer that counts epochs by StopIteration stays in step with the loader.
        """
        if self.batches_remaining == 0:
            self._advance()
            return
        stream = self._snapshot()
        if self.num_workers == 0:
            batches = iter(stream) if not self.pin_memory else (b.pin_memory() for b in stream)
        else:
            batches = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                      prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                      multiprocessing_context=self.mp_context, pin_memory=self.pin_memory))
        done = 0
        for batch in batches:
            self.position = min(self.position + self.global_batch, self.epoch_length)
            for reason, n in batch.bad.items():
                self.bad_samples[reason] = self.bad_samples.get(reason, 0) + n
            done += 1
            yield batch
        if done != stream.steps:
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} gave {done} batches, expected {stream.steps}")
        self._advance()
