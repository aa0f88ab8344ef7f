"""An in-memory stand-in reader with StreamingLoader's interface (global-position state)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from condmoe.datasets.idx import load_fashion_mnist


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]


class MemoryLoader:
    def __init__(self, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, limit: int = 512) -> None:
        x, y = load_fashion_mnist("train" if split == "train" else "test", limit=limit)
        self.x = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        self.y = torch.from_numpy(y.astype(np.int64))
        self.split, self.batch_size, self.rank, self.world = split, batch_size, rank, world_size
        self.seed, self.epoch, self.pos = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    def __len__(self) -> int:
        return len(self.y) // (self.batch_size * self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.y), generator=g)
        gb = self.batch_size * self.world
        while self.pos + gb <= len(order):
            idx = order[self.pos + self.rank * self.batch_size: self.pos + (self.rank + 1) * self.batch_size]
            self.pos += gb
            yield Batch(self.x[idx], self.y[idx], [f"{self.split}-{int(i)}" for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def memory_factory(cfg, split, batch_size, rank, world_size, train):
    return MemoryLoader(split, batch_size, rank=rank, world_size=world_size, seed=cfg.data.seed)
