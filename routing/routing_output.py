"""What every router returns and every routed layer reports.

A router turns an input into a :class:`RoutingOutput` (weights, optional hard
indices, aux losses, stats). Aux losses travel in the returned value, never in
module globals. Every routed module records its latest :class:`RoutingStats`
(``RoutedModule.last_stats``) so the trainer can collect them by walking the
model with :func:`collect_routing_stats`, without knowing which method a
layer implements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class RoutingStats:
    """Expert-use counters of one routed layer, summable over steps and ranks.

    load: (E,) float64 on CPU. Hard routing: assignments per expert (items sent
        there, before capacity drops). Soft routing: the routing weights summed
        over the samples.
    samples: samples (or tokens) that reached the router.
    dropped: items dropped because an expert was over capacity.
    early_exits: samples that left before this layer's experts ran.
    """

    load: torch.Tensor
    samples: int = 0
    dropped: int = 0
    early_exits: int = 0
    kind: str = "hard"

    @classmethod
    def from_load(
        cls,
        load: torch.Tensor,
        samples: int,
        *,
        dropped: int = 0,
        early_exits: int = 0,
        kind: str = "hard",
    ) -> "RoutingStats":
        if kind not in ("hard", "soft"):
            raise ValueError(f"RoutingStats kind must be 'hard' or 'soft', got {kind!r}")
        return cls(
            load=load.detach().to(device="cpu", dtype=torch.float64).reshape(-1),
            samples=int(samples),
            dropped=int(dropped),
            early_exits=int(early_exits),
            kind=kind,
        )

    @property
    def num_experts(self) -> int:
        return int(self.load.numel())

    @property
    def fraction(self) -> torch.Tensor:
        """(E,) share of the load per expert (zeros when nothing was routed)."""
        total = self.load.sum()
        return self.load / total if total > 0 else torch.zeros_like(self.load)

    @property
    def entropy(self) -> float:
        """Entropy of the load distribution over experts, normalised to 0..1.

        1 means every expert carries the same load, 0 that one expert carries all.
        """
        if self.num_experts <= 1:
            return 1.0
        p = self.fraction
        if p.sum() <= 0:
            return 0.0
        h = -(p * torch.log(p.clamp_min(1e-30))).sum().item()
        return max(0.0, min(1.0, h / math.log(self.num_experts)))

    @property
    def imbalance(self) -> float:
        """max/mean expert load: 1.0 is perfect balance, E is total collapse."""
        mean = self.load.mean().item()
        return self.load.max().item() / mean if mean > 0 else 0.0

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        if self.load.shape != other.load.shape:
            raise ValueError(
                f"cannot add RoutingStats over {self.num_experts} and {other.num_experts} experts"
            )
        return RoutingStats(
            load=self.load + other.load,
            samples=self.samples + other.samples,
            dropped=self.dropped + other.dropped,
            early_exits=self.early_exits + other.early_exits,
            kind=self.kind,
        )

    def to_tensor(self) -> torch.Tensor:
        """Flatten to (E + 3,) float64 for an all-reduce; inverse: :meth:`from_tensor`."""
        extra = torch.tensor([self.samples, self.dropped, self.early_exits], dtype=torch.float64)
        return torch.cat([self.load, extra])

    @classmethod
    def from_tensor(cls, t: torch.Tensor, kind: str = "hard") -> "RoutingStats":
        t = t.detach().to(device="cpu", dtype=torch.float64)
        return cls(
            load=t[:-3].clone(),
            samples=int(round(t[-3].item())),
            dropped=int(round(t[-2].item())),
            early_exits=int(round(t[-1].item())),
            kind=kind,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingStats":
        """Inverse of :meth:`as_dict` (entropy and imbalance are derived, so ignored)."""
        return cls.from_load(torch.as_tensor(d["load"], dtype=torch.float64), d["samples"],
                             dropped=d["dropped"], early_exits=d["early_exits"], kind=d["kind"])

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "load": self.load.tolist(),
            "samples": self.samples,
            "dropped": self.dropped,
            "early_exits": self.early_exits,
            "entropy": self.entropy,
            "imbalance": self.imbalance,
        }


@dataclass(frozen=True)
class RoutingOutput:
    """A router's decision for one batch.

    weights: (B, E) routing weights (soft: mixing coefficients; hard: gate values).
    indices: (B, k) chosen experts for hard routing, None for soft routing.
    aux_losses: named scalar losses the trainer adds (already weighted).
    stats: the expert-use counters of this batch.
    """

    weights: torch.Tensor
    indices: torch.Tensor | None
    stats: RoutingStats
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class RoutedModule(nn.Module):
    """Mixin for modules that route: they record their latest stats for collection.

    ``last_stats`` is per-module state (not global); it is overwritten on each
    forward and read by :func:`collect_routing_stats`.
    """

    last_stats: RoutingStats | None = None

    def record_stats(self, stats: RoutingStats) -> None:
        self.last_stats = stats


def collect_routing_stats(model: nn.Module, *, clear: bool = True) -> dict[str, RoutingStats]:
    """Walk ``model`` and return {module name: latest RoutingStats} of every routed module.

    With ``clear`` the recorded stats are reset, so a module that did not run
    in the next step (e.g. skipped by early exit) is not counted twice.
    """
    out: dict[str, RoutingStats] = {}
    for name, module in model.named_modules():
        stats = getattr(module, "last_stats", None)
        if isinstance(module, RoutedModule) and stats is not None:
            out[name or "root"] = stats
            if clear:
                module.last_stats = None
    return out


def accumulate_stats(
    totals: dict[str, RoutingStats], new: dict[str, RoutingStats]
) -> dict[str, RoutingStats]:
    """Sum ``new`` into ``totals`` layer by layer (returns a new dict)."""
    merged = dict(totals)
    for name, stats in new.items():
        merged[name] = merged[name] + stats if name in merged else stats
    return merged
