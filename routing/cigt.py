"""CIGT: Conditional Information Gain Trellis, hard routing through a trellis of blocks.

Bicici, Meral, Akarun, "Conditional Information Gain Trellis", arXiv 2402.08345
(public code: ufukcbicici/cigt, PyTorch).

A trellis of L layers with ``paths = (K_0, ..., K_{L-1})`` parallel blocks
(default (1, 2, 4)). Each sample runs through ONE block per layer: after
layer l a router maps the sample's features to p(n|x) = softmax(z / T) over the
K_{l+1} blocks of the next layer. Routers are trained by the information-gain
loss only (:mod:`condmoe.routing.info_gain`; hard routing passes them no
cross-entropy gradient); the total loss is CE - lambda * sum_l IG_l. Every
block of the last layer ends in its own classifier head (one head per leaf).

Schedule (:class:`CIGTConfig`): during ``warmup_steps`` training iterations
samples take uniformly random paths (the IG loss is still optimised); after it,
argmax routing with a ``random_path_fraction`` of samples sent to a random
path, and temperature T = max(T0 * decay^t, T_min) with t counting iterations
since warm-up ended. The iteration counter is a buffer (checkpointed with the
weights) advanced by each training forward (one per micro-batch; the paper's
warm-up epochs are ``epochs x steps per epoch`` here).

Execution (``execution``): "gather" runs each block only on the samples routed
to it (index_select, block, then one scatter back; a block that receives no
sample is skipped; its batch norm sees only its own samples). "dense" runs every
block on every sample and keeps each sample's routed output: the reference the
gather form is tested and benchmarked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .expert_parallel import run_by_index
from .info_gain import information_gain_loss
from .model_output import ModelOutput
from .precision import Fp32Linear
from .routing_output import RoutedModule, RoutingOutput, RoutingStats

_EXECUTION = ("gather", "dense")


@dataclass(frozen=True)
class CIGTConfig:
    """paths: blocks per layer, first must be 1. info_gain_weight: lambda. info_gain_beta: beta.
    warmup_steps: training iterations of random routing. initial_temperature /
    temperature_decay / min_temperature: T schedule. random_path_fraction: share of
    samples sent to a random path after warm-up (training only). execution: "gather" | "dense".
    detach_router_input: our choice (the paper's detail not available to us): False lets the IG
    loss shape the features below each router too; True trains only the routers with it."""

    paths: tuple[int, ...] = (1, 2, 4)
    info_gain_weight: float = 1.0
    info_gain_beta: float = 1.0
    warmup_steps: int = 0
    initial_temperature: float = 25.0
    temperature_decay: float = 0.9999
    min_temperature: float = 0.1
    random_path_fraction: float = 0.0
    execution: str = "gather"
    detach_router_input: bool = False

    def __post_init__(self) -> None:
        if len(self.paths) < 1 or self.paths[0] != 1 or any(k < 1 for k in self.paths):
            raise ValueError(f"CIGT paths must start with 1 and be >= 1 each, got {self.paths}")
        if self.execution not in _EXECUTION:
            raise ValueError(f"CIGT execution must be one of {_EXECUTION}, got {self.execution!r}")
        if not 0.0 <= self.random_path_fraction <= 1.0:
            raise ValueError(f"CIGT random_path_fraction must be in [0, 1], got {self.random_path_fraction}")
        if self.warmup_steps < 0:
            raise ValueError(f"CIGT warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.initial_temperature <= 0 or self.min_temperature <= 0 or not 0 < self.temperature_decay <= 1:
            raise ValueError(f"CIGT temperature schedule invalid: T0={self.initial_temperature}, "
                             f"decay={self.temperature_decay}, T_min={self.min_temperature}")


class GridPool(nn.Module):
    """Adaptive average pool to (size, size): a no-op when the map already has that size, and
    the mean of four strided views when it is exactly twice that (4x faster than
    F.adaptive_avg_pool2d on CPU for (128, 32, 14, 14), same values)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.size
        if h.shape[-2:] == (s, s):
            return h
        if h.shape[-2:] == (2 * s, 2 * s):
            return (h[..., ::2, ::2] + h[..., 1::2, ::2] + h[..., ::2, 1::2] + h[..., 1::2, 1::2]) * 0.25
        return F.adaptive_avg_pool2d(h, s)


class MaxPool2x2(nn.Module):
    """2x2 max pooling, stride 2: the max of four strided views when H and W are even.

    Same values as nn.MaxPool2d(2) (ties share the gradient instead of going to one
    element). On CPU (torch 2.13, one thread, (128, 32, 28, 28)) F.max_pool2d took
    14 ms, this 1.5 ms: the pooling had cost as much as the convolutions around it.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] % 2 or h.shape[-2] % 2:
            return F.max_pool2d(h, 2)
        return torch.maximum(torch.maximum(h[..., ::2, ::2], h[..., 1::2, ::2]),
                             torch.maximum(h[..., ::2, 1::2], h[..., 1::2, 1::2]))


class CIGTRouter(RoutedModule):
    """The paper's router: pool -> flatten -> FC(hidden) -> ReLU -> Dropout -> BatchNorm1d -> FC(K).

    forward(h: (B, C, H, W), temperature) -> (z: (B, K) logits, p: (B, K) = softmax(z / T)).
    The pool is adaptive to ``pool_size`` (the paper's AvgPool stride s at 28x28
    input, written as an output size so any input size works).
    """

    def __init__(self, in_features: int, num_paths: int, *, hidden: int = 128, pool_size: int = 7,
                 dropout: float = 0.5, norm: bool = True) -> None:
        super().__init__()
        self.pool = GridPool(pool_size)
        self.fc1 = nn.Linear(in_features * pool_size * pool_size, hidden)
        self.dropout = nn.Dropout(dropout)
        self.bn = nn.BatchNorm1d(hidden) if norm else nn.Identity()
        self.fc2 = Fp32Linear(hidden, num_paths)  # logits, softmax and the information gain in fp32
        self.num_paths = num_paths

    def forward(self, h: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.fc2(self.bn(self.dropout(F.relu(self.fc1(self.pool(h).flatten(1))))))
        return z, (z / temperature).softmax(-1)


def run_routed(blocks: nn.ModuleList, h: torch.Tensor, path: torch.Tensor, execution: str = "gather",
               touch_idle: bool = False) -> torch.Tensor:
    """Output row i = blocks[path[i]](h[i]).  h: (B, ...), path: (B,) -> (B, ...out).

    "gather": each block runs once on exactly its samples (empty blocks skipped):
    :func:`~condmoe.routing.expert_parallel.run_by_index`, as CoE's local experts.
    "dense": every block runs on every sample, then each sample's routed output is kept.
    """
    if len(blocks) == 1:
        return blocks[0](h)
    if execution == "dense":
        outs = torch.stack([blk(h) for blk in blocks])  # (K, B, ...)
        return outs[path, torch.arange(h.shape[0], device=h.device)]
    return run_by_index(blocks, h, path, touch_idle=touch_idle)


class CIGT(nn.Module):
    """A routed trellis. layers[l]: nn.ModuleList of paths[l] blocks; routers[l] routes into layer l+1.

    The last layer's blocks return class logits (B, num_classes).
    forward(x: (B, C, H, W), targets: (B,) | None) -> ModelOutput; losses: "ce",
    "info_gain_<l>" (= -lambda * IG_l, the term added to the loss).
    """

    label_smoothing: float = 0.0  # of the class-target cross-entropies (build_model(label_smoothing=) sets it)

    def __init__(self, layers: list[nn.ModuleList], routers: list[CIGTRouter], config: CIGTConfig, *,
                 num_classes: int) -> None:
        super().__init__()
        if [len(b) for b in layers] != list(config.paths):
            raise ValueError(f"CIGT layers have {[len(b) for b in layers]} blocks, config.paths is {config.paths}")
        if len(routers) != len(layers) - 1:
            raise ValueError(f"CIGT needs {len(layers) - 1} routers, got {len(routers)}")
        for l, r in enumerate(routers):
            if r.num_paths != config.paths[l + 1]:
                raise ValueError(f"router {l} chooses among {r.num_paths} paths, layer {l + 1} has "
                                 f"{config.paths[l + 1]}")
        self.config = config
        self.num_classes = num_classes
        self.layers = nn.ModuleList(layers)
        self.routers = nn.ModuleList(routers)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def in_warmup(self) -> bool:
        return int(self.step) < self.config.warmup_steps

    def temperature(self) -> float:
        """T = max(T0 * decay^t, T_min), t = iterations since warm-up ended (T0 during warm-up)."""
        c = self.config
        t = max(0, int(self.step) - c.warmup_steps)
        return max(c.initial_temperature * c.temperature_decay**t, c.min_temperature)

    def _choose(self, probs: torch.Tensor) -> torch.Tensor:
        b, k = probs.shape
        if not self.training:
            return probs.argmax(-1)
        if self.in_warmup:
            return torch.randint(0, k, (b,), device=probs.device)
        path = probs.argmax(-1)
        if self.config.random_path_fraction > 0:
            rand = torch.rand(b, device=probs.device) < self.config.random_path_fraction
            path = torch.where(rand, torch.randint(0, k, (b,), device=probs.device), path)
        return path

    def route(self, l: int, h: torch.Tensor, temperature: float, targets: torch.Tensor | None) -> RoutingOutput:
        """Router l's decision for features h (B, ...): weights p(n|x) (B, K), indices (B, 1) paths,
        aux_losses {"info_gain_<l>": -lambda * IG} when targets are given; records the router's stats."""
        cfg = self.config
        router = self.routers[l]
        _, probs = router(h.detach() if cfg.detach_router_input else h, temperature)
        path = self._choose(probs)
        aux: dict[str, torch.Tensor] = {}
        if targets is not None:
            aux[f"info_gain_{l}"] = information_gain_loss(probs, targets, self.num_classes,
                                                          beta=cfg.info_gain_beta, weight=cfg.info_gain_weight)
        stats = RoutingStats.from_load(torch.bincount(path, minlength=router.num_paths), h.shape[0])
        router.record_stats(stats)
        return RoutingOutput(weights=probs, indices=path[:, None], stats=stats, aux_losses=aux)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        cfg = self.config
        temperature = self.temperature()
        b = x.shape[0]
        h = x
        path = torch.zeros(b, dtype=torch.long, device=x.device)
        losses: dict[str, torch.Tensor] = {}
        aux_total: torch.Tensor | float = 0.0
        for l, blocks in enumerate(self.layers):
            h = run_routed(blocks, h, path, cfg.execution, touch_idle=self.training)
            if l == len(self.layers) - 1:
                break
            routing = self.route(l, h, temperature, targets)
            path = routing.indices[:, 0]
            for name, value in routing.aux_losses.items():
                aux_total = aux_total + value
                losses[name] = value.detach()
        logits = h
        out = ModelOutput(logits=logits)
        if targets is not None:
            ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
            out.loss = ce + aux_total
            out.losses = {"ce": ce.detach(), **losses}
        if self.training:
            self.step += 1
        return out
