"""Helpers for the datasets tests (imported by name: tests/datasets is on sys.path under pytest)."""

from __future__ import annotations

import numpy as np
import torch

from condmoe.datasets import StreamingLoader
from condmoe.datasets.plan import epoch_sequence


def read_epoch(loader: StreamingLoader, stop_after: int | None = None) -> list[str]:
    """Keys of the batches the loader yields (all of the epoch, or the first ``stop_after`` batches)."""
    keys: list[str] = []
    for n, batch in enumerate(loader, 1):
        keys += batch.keys
        if stop_after is not None and n == stop_after:
            break
    return keys


def expected_keys(loader: StreamingLoader) -> list[str]:
    """The keys of the loader's current epoch sequence in order (from the plan, reading every shard once)."""
    from condmoe.datasets.shardio import read_shard

    names = [{i: k for i, (k, _) in read_shard(s.url).samples.items()} for s in loader.shards]
    seq_s, seq_i = epoch_sequence([s.samples for s in loader.shards], loader.seed, loader.epoch, loader.carry,
                                  loader.shuffle, loader.mix_shards)
    return [names[s][i] for s, i in zip(seq_s.tolist(), seq_i.tolist())]


def denormalise(images: torch.Tensor, loader: StreamingLoader) -> np.ndarray:
    """Back to uint8 (B, H, W, C) from the loader's normalised (B, C, H, W) floats."""
    mean = torch.tensor(loader.mean).view(1, -1, 1, 1)
    std = torch.tensor(loader.std).view(1, -1, 1, 1)
    x = (images * std + mean) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
