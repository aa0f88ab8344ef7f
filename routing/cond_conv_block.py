"""CondConv routing function and the inverted-residual block that shares it.

Yang et al., "CondConv", NeurIPS 2019, arXiv 1904.04971: routing weights are
``alpha(x) = sigmoid(FC(GAP(x)))``, one value per expert, not normalised, computed
once per block from the block input and shared by every CondConv layer of the
block. The block is MobileNetV2's inverted residual (Sandler et al., arXiv
1801.04381): 1x1 expand -> 3x3 depthwise -> 1x1 project, residual when shapes
allow. With ``num_experts == 1`` the block is the static baseline of the same
shape: plain ``nn.Conv2d`` layers and no router.
"""

from __future__ import annotations

import torch
from torch import nn

from .cond_conv2d import CondConv2d
from .routing_output import RoutedModule, RoutingOutput, RoutingStats


class CondConvRouter(RoutedModule):
    """alpha(x) = sigmoid(FC(GAP(x))) (or softmax(FC/T) for BasisNet-style mixing).

    forward(x: (B, C, H, W)) -> RoutingOutput with weights (B, E), indices None.
    """

    def __init__(self, in_channels: int, num_experts: int, *, activation: str = "sigmoid",
                 temperature: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"router activation must be 'sigmoid' or 'softmax', got {activation!r}")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        self.fc = nn.Linear(in_channels, num_experts)
        self.activation = activation
        self.temperature = temperature
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> RoutingOutput:
        pooled = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        logits = self.fc(self.dropout(pooled))
        if self.activation == "sigmoid":
            weights = torch.sigmoid(logits)
        else:
            weights = torch.softmax(logits / self.temperature, dim=-1)
        stats = RoutingStats.from_load(weights.detach().sum(0), x.shape[0], kind="soft")
        self.record_stats(stats)
        return RoutingOutput(weights=weights, indices=None, stats=stats)


def _conv(in_ch: int, out_ch: int, k: int, stride: int, groups: int, experts: int) -> nn.Module:
    if experts == 1:
        return nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False)
    return CondConv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False, num_experts=experts)


class CondConvInvertedResidual(nn.Module):
    """MobileNetV2 inverted residual whose three convolutions are CondConv layers.

    forward(x: (B, C_in, H, W), routing_weights: (B, E) | None) -> (B, C_out, H/stride, W/stride).
    With ``own_router`` the block computes its routing weights from its input
    (CondConv); without, the caller passes them (BasisNet's shared coefficients).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, expand_ratio: int = 4,
                 num_experts: int = 8, own_router: bool = True, router_dropout: float = 0.0) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"inverted residual stride must be 1 or 2, got {stride}")
        hidden = in_channels * expand_ratio
        self.num_experts = num_experts
        self.use_residual = stride == 1 and in_channels == out_channels
        self.router = (
            CondConvRouter(in_channels, num_experts, dropout=router_dropout)
            if own_router and num_experts > 1 else None
        )
        self.expand = _conv(in_channels, hidden, 1, 1, 1, num_experts)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = _conv(hidden, hidden, 3, stride, hidden, num_experts)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = _conv(hidden, out_channels, 1, 1, 1, num_experts)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU6(inplace=True)

    def _run_conv(self, conv: nn.Module, x: torch.Tensor, rw: torch.Tensor | None) -> torch.Tensor:
        return conv(x) if rw is None else conv(x, rw)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        rw = routing_weights
        if self.num_experts > 1 and rw is None:
            if self.router is None:
                raise ValueError("this block has no router: pass routing_weights (B, E)")
            rw = self.router(x).weights
        if self.num_experts == 1:
            rw = None
        out = self.act(self.bn1(self._run_conv(self.expand, x, rw)))
        out = self.act(self.bn2(self._run_conv(self.depthwise, out, rw)))
        out = self.bn3(self._run_conv(self.project, out, rw))
        return out + x if self.use_residual else out
