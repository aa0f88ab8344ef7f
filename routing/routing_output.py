"""What every router returns and every routed layer reports.

A router turns an input into a :class:`RoutingOutput` (weights, optional hard
indices, aux losses, stats). Aux losses travel in the returned value, never in
module globals. Every routed module records its latest :class:`RoutingStats`
(``RoutedModule.last_stats``) so the trainer can collect them by walking the
model with :func:`collect_routing_stats`, without knowing which method a
layer implements.

Routing diversity: aggregate load cannot tell whether soft routing is
conditional at all (8 experts near 12.5% each look the same whether every
image uses one mixture or each its own). A router that hands its per-image
weights to :meth:`RoutingStats.from_weights` also records, as sums that add up
exactly over steps and ranks, each image's mixture p_i = w_i / sum(w_i):
``diversity`` is the RMS L2 distance of the p_i from their mean, divided by
its largest possible value sqrt(1 - 1/E) (0: every image the same mixture,
1: every image one-hot and the experts used equally), and
``mixture_entropy`` the mean per-image entropy over log E (0: each image picks
one expert, 1: each image mixes all equally). Pooled over any set of images
(one step's batch on one rank, an interval, a run) the result is the same as
computing it on all of those images at once.
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
    mix_sum: (E,) float64, the per-image mixtures p_i summed (None: the layer recorded none);
    mix_sq: sum of ||p_i||^2; mix_entropy: sum of the p_i's entropies (nats);
    mix_count: images whose mixture was recorded (see :meth:`from_weights`).
    """

    load: torch.Tensor
    samples: int = 0
    dropped: int = 0
    early_exits: int = 0
    kind: str = "hard"
    mix_sum: torch.Tensor | None = None
    mix_sq: float = 0.0
    mix_entropy: float = 0.0
    mix_count: int = 0

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

    @classmethod
    def from_weights(
        cls,
        weights: torch.Tensor,
        samples: int | None = None,
        *,
        early_exits: int = 0,
        kind: str = "soft",
    ) -> "RoutingStats":
        """Stats of a batch's routing weights (B, E): load = weights summed over the images,
        plus the per-image mixture sums behind ``diversity`` and ``mixture_entropy``.

        samples: images that reached the router (default B; more when some exited before
        the weights were used, then ``early_exits`` says how many).
        """
        w = weights.detach()
        if w.dim() != 2:
            raise ValueError(f"routing weights must be (B, E), got shape {tuple(w.shape)}")
        n, e = w.shape
        p = w.double().clamp_min(0.0)
        total = p.sum(-1, keepdim=True)
        p = torch.where(total > 0, p / total.clamp_min(1e-300), torch.full_like(p, 1.0 / max(e, 1)))
        moments = torch.stack([(p * p).sum(), -(p * torch.log(p.clamp_min(1e-300))).sum()]).cpu()
        base = cls.from_load(w.sum(0), n if samples is None else samples, early_exits=early_exits, kind=kind)
        return RoutingStats(load=base.load, samples=base.samples, early_exits=base.early_exits, kind=kind,
                            mix_sum=p.sum(0).cpu(), mix_sq=float(moments[0]), mix_entropy=float(moments[1]),
                            mix_count=n)

    @property
    def diversity(self) -> float | None:
        """How much the per-image mixtures differ, 0..1 (module docstring); None without mixtures."""
        e = self.num_experts
        if self.mix_count <= 0 or self.mix_sum is None or e <= 1:
            return None
        mean = self.mix_sum / self.mix_count
        spread = self.mix_sq / self.mix_count - float((mean * mean).sum())
        return math.sqrt(max(0.0, min(1.0, spread / (1.0 - 1.0 / e))))

    @property
    def mixture_entropy(self) -> float | None:
        """Mean per-image entropy of the mixtures over log E, 0..1; None without mixtures."""
        e = self.num_experts
        if self.mix_count <= 0 or e <= 1:
            return None
        return max(0.0, min(1.0, self.mix_entropy / self.mix_count / math.log(e)))

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
        mix = None
        if self.mix_sum is not None or other.mix_sum is not None:
            zero = torch.zeros_like(self.load)
            mix = (zero if self.mix_sum is None else self.mix_sum) + (zero if other.mix_sum is None else other.mix_sum)
        return RoutingStats(
            load=self.load + other.load,
            samples=self.samples + other.samples,
            dropped=self.dropped + other.dropped,
            early_exits=self.early_exits + other.early_exits,
            kind=self.kind,
            mix_sum=mix,
            mix_sq=self.mix_sq + other.mix_sq,
            mix_entropy=self.mix_entropy + other.mix_entropy,
            mix_count=self.mix_count + other.mix_count,
        )

    @staticmethod
    def tensor_size(experts: int) -> int:
        """Length of :meth:`to_tensor` for a layer of ``experts`` experts: 2E + 6."""
        return 2 * experts + 6

    def to_tensor(self) -> torch.Tensor:
        """Flatten to (2E + 6,) float64 for an all-reduce; inverse: :meth:`from_tensor`.

        Layout: load (E), samples, dropped, early_exits, mix_sum (E), mix_sq, mix_entropy, mix_count.
        """
        mix = self.mix_sum if self.mix_sum is not None else torch.zeros_like(self.load)
        return torch.cat([
            self.load, torch.tensor([self.samples, self.dropped, self.early_exits], dtype=torch.float64),
            mix, torch.tensor([self.mix_sq, self.mix_entropy, self.mix_count], dtype=torch.float64)])

    @classmethod
    def from_tensor(cls, t: torch.Tensor, kind: str = "hard") -> "RoutingStats":
        t = t.detach().to(device="cpu", dtype=torch.float64)
        if t.numel() < 8 or (t.numel() - 6) % 2:
            raise ValueError(f"a RoutingStats tensor has 2E + 6 values, got {t.numel()}")
        e = (t.numel() - 6) // 2
        count = int(round(t[-1].item()))
        return cls(
            load=t[:e].clone(),
            samples=int(round(t[e].item())),
            dropped=int(round(t[e + 1].item())),
            early_exits=int(round(t[e + 2].item())),
            kind=kind,
            mix_sum=t[e + 3:2 * e + 3].clone() if count > 0 else None,
            mix_sq=float(t[-3]),
            mix_entropy=float(t[-2]),
            mix_count=count,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingStats":
        """Inverse of :meth:`as_dict` (entropy, imbalance, diversity and mixture_entropy are derived,
        so ignored); the mixture sums are optional (rows and checkpoints written before them)."""
        base = cls.from_load(torch.as_tensor(d["load"], dtype=torch.float64), d["samples"],
                             dropped=d["dropped"], early_exits=d["early_exits"], kind=d["kind"])
        count = int(d.get("mix_count") or 0)
        if count <= 0 or d.get("mix_sum") is None:
            return base
        return RoutingStats(load=base.load, samples=base.samples, dropped=base.dropped,
                            early_exits=base.early_exits, kind=base.kind,
                            mix_sum=torch.as_tensor(d["mix_sum"], dtype=torch.float64).reshape(-1),
                            mix_sq=float(d.get("mix_sq") or 0.0), mix_entropy=float(d.get("mix_entropy") or 0.0),
                            mix_count=count)

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "load": self.load.tolist(),
            "samples": self.samples,
            "dropped": self.dropped,
            "early_exits": self.early_exits,
            "entropy": self.entropy,
            "imbalance": self.imbalance,
            "mix_sum": None if self.mix_sum is None else self.mix_sum.tolist(),
            "mix_sq": self.mix_sq,
            "mix_entropy": self.mix_entropy,
            "mix_count": self.mix_count,
            "diversity": self.diversity,
            "mixture_entropy": self.mixture_entropy,
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
