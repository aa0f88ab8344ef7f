"""CondConv routing function and the inverted-residual block that shares it.

Yang et al., "CondConv", NeurIPS 2019, arXiv 1904.04971: routing weights are
``alpha(x) = sigmoid(FC(GAP(x)))``, one value per expert, not normalised, computed
once per block from the block input and shared by every CondConv layer of the
block. The block is MobileNetV2's inverted residual (Sandler et al., arXiv
1801.04381): 1x1 expand -> kxk depthwise -> [squeeze-excite] -> 1x1 project,
residual when shapes allow; kernel size, activation and squeeze-excite make it
EfficientNet's MBConv (arXiv 1905.11946) and MobileNetV3's block (arXiv
1905.02244) too. With ``expand_ratio == 1`` there is no expand convolution
(MobileNetV2's first block, EfficientNet's and MobileNetV3's depthwise-separable
first block). With ``num_experts == 1`` the block is the static baseline of the
same shape: plain ``nn.Conv2d`` layers and no router.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation
from .cond_conv2d import CondConv2d
from .precision import Fp32Linear
from .routing_output import RoutedModule, RoutingOutput, RoutingStats
from .squeeze_excite import SqueezeExcite


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
        self.fc = Fp32Linear(in_channels, num_experts)  # logits and sigmoid/softmax in fp32 (precision.py)
        self.activation = activation
        self.temperature = temperature
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> RoutingOutput:
        pooled = x.mean(dim=(2, 3), dtype=torch.float32) if x.dim() == 4 else x
        logits = self.fc(self.dropout(pooled))
        if self.activation == "sigmoid":
            weights = torch.sigmoid(logits)
        else:
            weights = torch.softmax(logits / self.temperature, dim=-1)
        stats = RoutingStats.from_weights(weights, kind="soft")  # load + per-image mixture sums
        self.record_stats(stats)
        return RoutingOutput(weights=weights, indices=None, stats=stats)


def _conv(in_ch: int, out_ch: int, k: int, stride: int, groups: int, experts: int) -> nn.Module:
    if experts == 1:
        return nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False)
    return CondConv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False, num_experts=experts)


class CondConvInvertedResidual(nn.Module):
    """Inverted residual (MBConv) whose expand, depthwise and project convolutions are CondConv layers.

    forward(x: (B, C_in, H, W), routing_weights: (B, E) | None) -> (B, C_out, H/stride, W/stride).
    With ``own_router`` the block computes its routing weights from its input
    (CondConv); without, the caller passes them (BasisNet's shared coefficients).
    hidden_channels: the expanded width (default in_channels * expand_ratio).
    se_channels > 0 adds a static squeeze-excite of that reduced width after the
    depthwise convolution (activation ``se_activation``, default the block's; gate ``se_gate``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, expand_ratio: float = 4,
                 num_experts: int = 8, own_router: bool = True, router_dropout: float = 0.0, kernel_size: int = 3,
                 activation: str = "relu6", hidden_channels: int | None = None, se_channels: int = 0,
                 se_activation: str | None = None, se_gate: str = "sigmoid") -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"inverted residual stride must be 1 or 2, got {stride}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"inverted residual kernel_size must be odd and >= 1, got {kernel_size}")
        hidden = hidden_channels if hidden_channels is not None else int(round(in_channels * expand_ratio))
        if expand_ratio == 1 and hidden != in_channels:
            raise ValueError(f"expand_ratio=1 means no expansion, but hidden_channels={hidden} != {in_channels}")
        self.num_experts = num_experts
        self.use_residual = stride == 1 and in_channels == out_channels
        self.router = (
            CondConvRouter(in_channels, num_experts, dropout=router_dropout)
            if own_router and num_experts > 1 else None
        )
        if expand_ratio != 1:
            self.expand = _conv(in_channels, hidden, 1, 1, 1, num_experts)
            self.bn1 = nn.BatchNorm2d(hidden)
        else:
            self.expand = self.bn1 = None
        self.depthwise = _conv(hidden, hidden, kernel_size, stride, hidden, num_experts)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = (SqueezeExcite(hidden, se_channels, activation=se_activation or activation, gate=se_gate)
                   if se_channels > 0 else None)
        self.project = _conv(hidden, out_channels, 1, 1, 1, num_experts)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act = make_activation(activation)

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
        out = x if self.expand is None else self.act(self.bn1(self._run_conv(self.expand, x, rw)))
        out = self.act(self.bn2(self._run_conv(self.depthwise, out, rw)))
        if self.se is not None:
            out = self.se(out)
        out = self.bn3(self._run_conv(self.project, out, rw))
        return out + x if self.use_residual else out
