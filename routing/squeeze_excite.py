"""Squeeze-and-excitation: per-channel gates from the pooled feature map.

Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018, arXiv 1709.01507;
in the mobile form of EfficientNet (arXiv 1905.11946: reduce to a quarter of the
block INPUT channels, swish, sigmoid gate) and MobileNetV3 (arXiv 1905.02244:
reduce to a quarter of the expanded channels rounded to 8, ReLU, hard-sigmoid
gate). The reduced width is the caller's choice. In CondConv networks the SE
convolutions stay static (Yang et al., arXiv 1904.04971; TensorFlow's condconv
EfficientNet and timm's CondConvResidual both keep them plain).
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation


class SqueezeExcite(nn.Module):
    """x * gate(W2 act(W1 GAP(x))), two 1x1 convolutions with bias.

    forward(x: (B, C, H, W)) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduced: int, *, activation: str = "relu", gate: str = "sigmoid") -> None:
        super().__init__()
        if channels < 1 or reduced < 1:
            raise ValueError(f"SqueezeExcite needs channels >= 1 and reduced >= 1, got {channels}, {reduced}")
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = make_activation(activation)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = make_activation(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))
