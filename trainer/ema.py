"""An exponential moving average (EMA) of the weights, used for evaluation and saved in checkpoints.

The recipes of the papers condmoe follows evaluate an average of the weights,
not the last ones: EfficientNet (arXiv:1905.11946) and the CondConv networks
built on it (arXiv:1904.04971) keep ``moving_average_decay=0.9999`` with
TensorFlow's ``ExponentialMovingAverage(num_updates=global_step)``, MobileNetV3
(arXiv:1905.02244) 0.9999 too. After optimiser step t::

    d_t  = min(decay, (1 + t) / (10 + t))     (TensorFlow's num_updates rule; plain ``decay`` without warmup)
    ema <- d_t * ema + (1 - d_t) * w_t

With ``every = N`` the update runs every N steps with d_t ** N (the same
averaging horizon at 1/N of the cost). Averaged: every float parameter and
float buffer (BatchNorm running statistics too, as TensorFlow averages its
moving statistics); integer buffers are left alone.

Each rank keeps the average of the weights it holds, in fp32 on their device:
with ZeRO 0-2 every rank holds the whole dense model, and with expert
parallelism its local experts. ZeRO 3 (each rank a slice of every weight) is
refused by the config. Under bf16 the module holds bf16 copies of DeepSpeed's
fp32 master weights: those are what is averaged (into fp32, where the rounding
noise averages out). A checkpoint stores it as ``ema.pt`` (rank 0 writes it;
expert entries gathered from their ranks and named by GLOBAL expert id, like
portable.pt), read back with ``torch.load(weights_only=True)`` on any worker
count or ep_size.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .ds_checkpoint import global_names, storable

log = logging.getLogger(__name__)

EMA_FILE = "ema.pt"


class WeightEma:
    """fp32 EMA of ``module``'s float parameters and buffers on this rank.

    update(step) after each optimiser step; ``with ema.applied(): ...`` runs with the
    averaged weights in place (copied into the live tensors, which DeepSpeed's ZeRO 1/2
    flat buffers view, and copied back after); save/load: ``ema.pt`` in a checkpoint.
    """

    def __init__(self, module: nn.Module, *, decay: float, every: int = 1, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.module, self.decay, self.every, self.warmup = module, decay, every, warmup
        self.names, experts = global_names(module)
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()
        self.experts = experts & self.shadow.keys()  # what other ranks do not hold

    def live(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(local name, tensor) of what is averaged: float parameters, then float buffers."""
        for name, t in chain(self.module.named_parameters(), self.module.named_buffers()):
            if t.is_floating_point():
                yield name, t

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights."""
        self.shadow = {n: t.detach().float().clone() for n, t in self.live()}
        self.updates = 0

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimiser step ``step`` (``every`` folded in)."""
        d = min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay
        return d ** self.every

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """After optimiser step ``step`` (1-based): fold the weights in when ``step`` is due."""
        if step % self.every:
            return False
        names, tensors = zip(*self.live())
        shadows = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadows, [t.detach().float() for t in tensors], 1.0 - self.decay_at(step))
        self.updates += 1
        return True

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the average into the live weights for good (a model that is only evaluated)."""
        for name, t in self.live():
            t.copy_(self.shadow[name])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block with the averaged weights in the model; the live weights come back after."""
        backup = [t.detach().clone() for _, t in self.live()]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, t), saved in zip(self.live(), backup):
                    t.copy_(saved)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's average by global name (CPU fp32), with the settings it was made with."""
        return {"weights": {self.names[n]: s.detach().cpu() for n, s in self.shadow.items()},
                "decay": self.decay, "every": self.every, "warmup": self.warmup, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's entries (global names) of a full state; a missing or misshapen one is an error."""
        weights = state["weights"]
        for name, s in self.shadow.items():
            gname = self.names[name]
            if gname not in weights:
                raise ValueError(f"the checkpoint's EMA has no entry {gname!r} (model changed?)")
            if tuple(weights[gname].shape) != tuple(s.shape):
                raise ValueError(f"EMA entry {gname!r}: checkpoint shape {tuple(weights[gname].shape)} "
                                 f"!= model {tuple(s.shape)}")
            s.copy_(weights[gname])
        self.updates = int(state.get("updates", 0))

    def save(self, directory: Path) -> None:
        """Write ``directory/ema.pt`` (collective: expert entries travel to rank 0, which writes)."""
        state = self.state_dict()
        if dist.is_initialized() and dist.get_world_size() > 1 and self.experts:
            mine = {self.names[n]: state["weights"][self.names[n]] for n in self.experts}
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
            for part in parts:
                for gname, t in part.items():
                    state["weights"].setdefault(gname, t)
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(storable(state, "EMA state"), Path(directory) / EMA_FILE)

    def load(self, directory: Path) -> bool:
        """Restore from ``directory/ema.pt`` (every rank); without one, restart the average at
        the loaded weights and return False."""
        path = Path(directory) / EMA_FILE
        if not path.is_file():
            log.warning("checkpoint %s holds no EMA: the average restarts at its weights", directory)
            self.reset()
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path}: refused to load: it holds more than tensors, numbers and "
                             "strings") from None
        self.load_state_dict(state)
        return True


def build_ema(cfg, module: nn.Module) -> WeightEma | None:
    """The job's EMA (``optim.ema``) of ``module``, or None when it is off."""
    e = cfg.optim.ema
    return WeightEma(module, decay=e.decay, every=e.every, warmup=e.warmup) if e.enabled else None
