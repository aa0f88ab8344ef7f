"""topk_moe_cnn: a CNN with one top-k MoE block whose experts are conv sub-networks (DeepSpeed MoE).

Stem: two strided 3x3 conv / BN / ReLU stages, adaptively pooled to 7x7 (the
map is 7x7 at 28x28 input; other input sizes work). MoE block: each sample's
(C, 7, 7) feature map is one token; each expert is a conv 3x3 / ReLU / conv 3x3
sub-network that keeps the shape (no batch norm: DeepSpeed runs experts on
capacity buffers padded with zero tokens); the block is residual
(h + MoE(h)). Head: strided conv, GAP, FC. Routing: GShard / Switch gating
(arXiv 2006.16668, 2101.03961) via :class:`condmoe.routing.topk_moe.TopKMoE`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model_output import ModelOutput
from ..topk_moe import ImageExpert, TopKMoE
from .registry import register_model

SIZES = {"tiny": (8, 16, 32), "small": (16, 32, 64), "base": (32, 64, 128)}
_GRID = 7


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def conv_expert(channels: int) -> nn.Sequential:
    """One expert body: (B, C, H, W) -> (B, C, H, W)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1))


class TopKMoECNN(nn.Module):
    """forward(x: (B, C, H, W), targets: (B,) | None) -> ModelOutput; losses "ce", "load_balance"."""

    label_smoothing: float = 0.0  # of the class-target cross-entropies (build_model(label_smoothing=) sets it)

    def __init__(self, channels: tuple[int, int, int], *, num_classes: int, in_channels: int, experts: int,
                 **moe_options) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.stem = nn.Sequential(_conv(in_channels, c0, 2), _conv(c0, c1, 2), nn.AdaptiveAvgPool2d(_GRID))
        self.shape = (c1, _GRID, _GRID)
        self.moe = TopKMoE(c1 * _GRID * _GRID, ImageExpert(conv_expert(c1), self.shape), experts, **moe_options)
        self.head = _conv(c1, c2, 2)
        self.classifier = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        h = self.stem(x)
        y, routing = self.moe(h.flatten(1))
        h = F.relu(h + y.view_as(h))
        logits = self.classifier(self.head(h).mean(dim=(2, 3)))
        out = ModelOutput(logits=logits)
        if targets is not None:
            ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
            out.loss = ce + sum(routing.aux_losses.values())
            out.losses = {"ce": ce.detach(), **{k: v.detach() for k, v in routing.aux_losses.items()}}
        return out


@dataclass(frozen=True)
class TopKMoeCnnOptions:
    """topk_moe_cnn's options (job file: ``model.options``): TopKMoE's, in DeepSpeed's names."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    k: int = 1  # experts per sample (top-k), 1 <= k <= experts
    capacity_factor: float = 1.25  # training capacity per expert, in units of tokens / E
    eval_capacity_factor: float = 2.0  # the same at evaluation
    min_capacity: int = 2  # capacity floor per expert; a batch needs at least this many samples per rank
    drop_tokens: bool = True  # False: no-drop (capacity grows to the largest expert load)
    use_rts: bool = True  # random token selection when an expert is over capacity
    noisy_gate_policy: str | None = None  # None | 'Jitter' | 'RSample' (RSample only with k = 1)
    use_residual: bool = False  # PR-MoE: a dense residual expert mixed with the MoE output
    second_expert_sampling: bool = True  # k = 2: pick the second expert with Gumbel noise (DeepSpeed's default)
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss
    stats_over_group: bool = True  # sum returned load stats over the expert-parallel group (one all-reduce)


@register_model("topk_moe_cnn", tuple(SIZES), options=TopKMoeCnnOptions)
def topk_moe_cnn(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int = 4, ep_size: int = 1,
                 options: TopKMoeCnnOptions = TopKMoeCnnOptions()) -> TopKMoECNN:
    """experts = E conv experts in one top-k MoE block, spread over ``ep_size`` workers."""
    return TopKMoECNN(SIZES[size], num_classes=num_classes, in_channels=in_channels, experts=experts,
                      ep_size=ep_size, **asdict(options))
