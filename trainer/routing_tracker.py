"""Routing statistics of a run: each step's per-layer stats, one all-reduce per report interval.

The loop :meth:`~RoutingTracker.record`\\ s each optimiser step's local stats
(micro-steps summed) and its local loss; :meth:`~RoutingTracker.flush`, called
once per report interval on every rank, sums every buffered step over all ranks
in ONE all-reduce of a flat float64 tensor and adds the result to the run
totals, which are then the same on every rank (checkpoints and the final
result read them without another collective).

The flat tensor has a fixed layout: one flag, then per step its loss and, for
every known routed layer, ``RoutingStats.to_tensor()`` plus a "ran here" count
(a layer that ran on no rank in a step is left out of that step, e.g. every
sample exited before it). The layout (layer names, expert counts, kinds) is
agreed at the first flush with an all_gather_object; later, a rank that meets
a layer the layout does not hold raises the flag, and only then is the layout
gathered again and the interval reduced a second time.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from condmoe.routing import RoutingStats, accumulate_stats

Layout = dict[str, tuple[int, str]]  # layer -> (experts, kind)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class RoutingTracker:
    """Buffers this rank's steps; ``flush`` returns them summed over ranks and updates ``totals``."""

    def __init__(self, totals: dict[str, RoutingStats] | None = None) -> None:
        self.totals: dict[str, RoutingStats] = dict(totals or {})  # all ranks, whole run
        self._steps: list[tuple[int, float, dict[str, RoutingStats]]] = []
        self._layout: Layout = {}
        self.collectives = 0  # all-reduces done (tests hold the one-per-interval rule with it)

    def record(self, step: int, stats: dict[str, RoutingStats], loss: float) -> None:
        """This rank's stats of optimiser step ``step`` and its loss (mean over micro-steps)."""
        self._steps.append((step, float(loss), dict(stats)))

    def flush(self) -> list[tuple[int, float, dict[str, RoutingStats]]]:
        """[(step, loss mean over ranks, {layer: stats summed over ranks})] since the last flush."""
        steps, self._steps = self._steps, []
        if _world() == 1:
            out = [(s, loss, dict(st)) for s, loss, st in steps]
        else:
            out = self._reduce(steps)
        for _, _, st in out:
            self.totals = accumulate_stats(self.totals, st)
        return out

    def _reduce(self, steps: list) -> list:
        if not self._layout:  # the first flush on every rank alike: agree on the layout first
            self._agree_layout(steps)
        unknown = any(n not in self._layout for _, _, st in steps for n in st)
        flat, layout = self._pack(steps, unknown)
        dist.all_reduce(flat)
        self.collectives += 1
        if flat[0] > 0:  # some rank met a layer the layout lacks: agree on a new one, reduce again
            self._agree_layout(steps)
            flat, layout = self._pack(steps, False)
            dist.all_reduce(flat)
            self.collectives += 1
        return self._unpack(flat, steps, layout)

    def _agree_layout(self, steps: list) -> None:
        local = dict(self._layout)
        for _, _, st in steps:
            local.update({n: (s.num_experts, s.kind) for n, s in st.items()})
        every: list = [None] * _world()
        dist.all_gather_object(every, local)
        merged: Layout = {}
        for part in every:
            for name, (experts, kind) in part.items():
                if merged.get(name, (experts, kind))[0] != experts:
                    raise RuntimeError(f"routed layer {name!r} has {merged[name][0]} experts on one rank "
                                       f"and {experts} on another")
                merged[name] = (experts, kind)
        self._layout = dict(sorted(merged.items()))

    def _pack(self, steps: list, unknown: bool) -> tuple[torch.Tensor, Layout]:
        layout = self._layout
        chunks = [torch.tensor([1.0 if unknown else 0.0], dtype=torch.float64)]
        for _, loss, st in steps:
            chunks.append(torch.tensor([loss], dtype=torch.float64))
            for name, (experts, _) in layout.items():
                s = st.get(name)
                size = RoutingStats.tensor_size(experts) + 1  # the stats, then a "ran here" count
                chunks.append(torch.zeros(size, dtype=torch.float64) if s is None else
                              torch.cat([s.to_tensor(), torch.ones(1, dtype=torch.float64)]))
        return torch.cat(chunks), layout

    @staticmethod
    def _unpack(flat: torch.Tensor, steps: list, layout: Layout) -> list:
        world, at, out = _world(), 1, []
        for step, _, _ in steps:
            loss = flat[at].item() / world
            at += 1
            merged: dict[str, RoutingStats] = {}
            for name, (experts, kind) in layout.items():
                size = RoutingStats.tensor_size(experts) + 1
                chunk = flat[at:at + size]
                at += size
                if chunk[-1] > 0:
                    merged[name] = RoutingStats.from_tensor(chunk[:-1], kind=kind)
            out.append((step, loss, merged))
        return out

    def state_dict(self) -> dict[str, dict]:
        """Run totals as ``RoutingStats.as_dict()`` per layer (saved in the checkpoint's meta)."""
        return {n: s.as_dict() for n, s in self.totals.items()}

    @classmethod
    def from_state(cls, state: dict[str, dict] | None) -> "RoutingTracker":
        return cls({n: RoutingStats.from_dict(d) for n, d in (state or {}).items()})


def check_finite(step: int, loss: float) -> None:
    """Raise FloatingPointError naming the step when the (all-rank) loss is not finite."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}")
