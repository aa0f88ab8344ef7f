"""Top-k mixture-of-experts layer on DeepSpeed MoE, with the load statistics DeepSpeed does not return.

Gating and load-balancing loss: GShard (Lepikhin et al., arXiv 2006.16668) and
Switch Transformer (Fedus et al., arXiv 2101.03961), as implemented by
``deepspeed.moe.layer.MoE``; residual experts: PR-MoE (Rajbhandari et al.,
DeepSpeed-MoE, arXiv 2201.05596).

:class:`TopKMoE` routes flat tokens (N, D). An expert may be any module mapping
(..., D) -> (..., D); :class:`ImageExpert` turns an image sub-network that keeps
its (C, H, W) shape into such an expert, so one token = one sample's feature map.

What we add to DeepSpeed's (output, l_aux, exp_counts):

- dropped: (token, expert) assignments evicted by the capacity limit. DeepSpeed's
  exp_counts are counted before capacity; its gate marks evicted routes with a
  negative expert index, which we read with a forward hook on the gate.
- load and dropped summed over the expert-parallel group (DeepSpeed's counts are
  per rank), when ``stats_over_group`` is set (one small all-reduce per forward),
  in the returned RoutingOutput; the recorded per-module stats stay per rank.
- the load-balancing loss returned as a weighted aux loss in RoutingOutput.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from .lazy_class import lazy_class, module_getattr
from .routing_output import RoutedModule, RoutingOutput, RoutingStats

log = logging.getLogger(__name__)

_NOISE_POLICIES = (None, "Jitter", "RSample")


def _make_idempotent_moe() -> type:
    """deepspeed.moe.layer.MoE whose set_deepspeed_parallelism may be called more than once.

    We join the expert-parallel group at construction (so the layer works without
    an engine); the DeepSpeed engine calls the method again, which upstream asserts on.
    """
    from deepspeed.moe.layer import MoE

    class IdempotentMoE(MoE):
        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.deepspeed_moe.ep_group is not None:
                return
            super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    return IdempotentMoE


_idempotent_moe_class = lazy_class(__name__, "_IdempotentMoE", _make_idempotent_moe)
__getattr__ = module_getattr(__name__, {"_IdempotentMoE": _idempotent_moe_class})


def _stats(counters: torch.Tensor) -> RoutingStats:
    """(E + 2,) [load..., samples, dropped] -> RoutingStats."""
    return RoutingStats.from_load(counters[:-2], int(counters[-2].item()), dropped=int(counters[-1].item()))


class ImageExpert(nn.Module):
    """Wrap an image sub-network (B, C, H, W) -> (B, C, H, W) as a token expert (..., C*H*W) -> (..., C*H*W)."""

    def __init__(self, body: nn.Module, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.body = body
        self.shape = tuple(shape)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lead = tokens.shape[:-1]
        y = self.body(tokens.reshape(-1, *self.shape))
        if tuple(y.shape[1:]) != self.shape:
            raise ValueError(f"ImageExpert body must keep the shape {self.shape}, returned {tuple(y.shape[1:])}")
        return y.reshape(*lead, -1)


class TopKMoE(RoutedModule):
    """Top-k MoE over tokens: forward(x: (N, D)) -> (y: (N, D), RoutingOutput).

    RoutingOutput.weights: (N, E) combine weights actually applied (zeros where not
    routed or dropped). indices: (N, k) chosen experts, -1 where the route was
    dropped for capacity. aux_losses: {"load_balance": aux_loss_weight * l_aux}.
    Stats: load = assignments per expert before capacity, dropped = evicted
    assignments, samples = tokens. RoutingOutput.stats (and ``last_group_stats``)
    are summed over the expert-parallel group when ``stats_over_group``; the
    recorded ``last_stats`` that collect_routing_stats reads stay this rank's own,
    so a trainer that sums every rank's stats does not count a group twice.

    Options (DeepSpeed's names): k (1, 2 or more), capacity_factor,
    eval_capacity_factor, min_capacity, drop_tokens (False = no-drop: capacity
    grows to the largest expert load), use_rts (random token selection),
    noisy_gate_policy (None | "Jitter" | "RSample"; RSample only with k = 1),
    use_residual (PR-MoE: a dense residual expert mixed with the MoE output),
    second_expert_sampling (k = 2: pick the second expert with Gumbel noise, DeepSpeed's default).
    ep_size > 1 needs torch.distributed initialised before construction.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int, *, k: int = 1, ep_size: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 drop_tokens: bool = True, use_rts: bool = True, noisy_gate_policy: str | None = None,
                 use_residual: bool = False, second_expert_sampling: bool = True, aux_loss_weight: float = 0.01,
                 stats_over_group: bool = True) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if ep_size < 1 or num_experts % ep_size != 0:
            raise ValueError(f"ep_size={ep_size} must be >= 1 and divide num_experts={num_experts}")
        if noisy_gate_policy not in _NOISE_POLICIES:
            raise ValueError(f"noisy_gate_policy must be one of {_NOISE_POLICIES}, got {noisy_gate_policy!r}")
        if noisy_gate_policy == "RSample" and k != 1:
            raise ValueError(f"noisy_gate_policy 'RSample' only works with k=1 in DeepSpeed, got k={k}")
        if capacity_factor <= 0 or eval_capacity_factor <= 0:
            raise ValueError(f"capacity factors must be > 0, got {capacity_factor} / {eval_capacity_factor}")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
        if ep_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"ep_size={ep_size} needs torch.distributed initialised first "
                             "(deepspeed.init_distributed('gloo') before building the model)")
        self.num_experts, self.k, self.ep_size = num_experts, k, ep_size
        self.hidden_size = hidden_size
        self.aux_loss_weight = aux_loss_weight
        self.stats_over_group = stats_over_group
        self.min_capacity = min_capacity
        self.moe = _idempotent_moe_class()(
            hidden_size, expert, num_experts=num_experts, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity, use_residual=use_residual,
            noisy_gate_policy=noisy_gate_policy, drop_tokens=drop_tokens, use_rts=use_rts,
            top2_2nd_expert_sampling=second_expert_sampling,
        )
        if ep_size > 1:
            self.moe.set_deepspeed_parallelism()
        self._gate_out: tuple | None = None
        self.last_group_stats: RoutingStats | None = None
        self.moe.deepspeed_moe.gate.register_forward_hook(self._capture_gate)

    def _capture_gate(self, module: nn.Module, inputs: tuple, output: tuple) -> None:
        self._gate_out = output

    @property
    def gate(self) -> nn.Module:
        """DeepSpeed's TopKGate (its ``wg`` Linear holds the gate weights)."""
        return self.moe.deepspeed_moe.gate

    @property
    def ep_group(self):
        return self.moe.deepspeed_moe.ep_group

    def capacity(self, num_tokens: int) -> int:
        """Per-expert capacity (per rank) DeepSpeed uses for ``num_tokens`` tokens when dropping."""
        g = self.gate
        factor = g.capacity_factor if self.training else g.eval_capacity_factor
        return max(math.ceil(num_tokens / self.num_experts * factor * self.k), self.min_capacity)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingOutput]:
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"TopKMoE expects tokens (N, {self.hidden_size}), got shape {tuple(x.shape)}")
        if x.shape[0] < self.min_capacity:
            raise ValueError(f"TopKMoE got {x.shape[0]} tokens, fewer than min_capacity={self.min_capacity} "
                             "(DeepSpeed requires tokens >= min_capacity; lower min_capacity)")
        self._gate_out = None
        y, l_aux, exp_counts = self.moe(x)
        if self._gate_out is None:
            raise RuntimeError("TopKMoE: DeepSpeed's gate hook did not fire; unsupported DeepSpeed version")
        _, _, _, indices, _, gates, _ = self._gate_out
        self._gate_out = None
        routes = indices.t().long()  # (N, k), -1 = dropped
        kept = routes >= 0
        weights = torch.zeros(x.shape[0], self.num_experts, dtype=gates.dtype, device=x.device)
        weights.scatter_add_(1, routes.clamp_min(0), (gates.t() * kept).detach())
        counters = torch.cat([
            exp_counts.detach().to(torch.float64).reshape(-1),
            torch.tensor([x.shape[0], int((~kept).sum())], dtype=torch.float64, device=exp_counts.device),
        ])
        # recorded for collect_routing_stats: this rank's counts (the trainer sums ranks itself)
        self.record_stats(_stats(counters))
        stats = self.last_stats
        if self.stats_over_group and self.ep_size > 1:
            counters = counters.clone()  # the recorded stats share its memory
            dist.all_reduce(counters, group=self.ep_group)
            stats = _stats(counters)
        self.last_group_stats = stats
        aux = {"load_balance": self.aux_loss_weight * l_aux}
        return y, RoutingOutput(weights=weights, indices=routes, stats=stats, aux_losses=aux)

    def macs(self, inputs: tuple, output) -> int:
        """The gate's FC (N x D x E), which DeepSpeed runs with F.linear; experts count themselves."""
        x = inputs[0]
        return int(x.shape[0]) * self.hidden_size * self.num_experts
