"""condconv_cnn: a MobileNetV2-style network of CondConv inverted-residual blocks.

CondConv (Yang et al., arXiv 1904.04971) on MobileNetV2 blocks (arXiv 1801.04381),
sized for small images (Fashion-MNIST 28x28). ``experts=1`` builds the static
baseline of exactly the same shape (plain convolutions, no routers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cond_conv_block import CondConvInvertedResidual
from ..model_output import ModelOutput
from .registry import register_model


@dataclass(frozen=True)
class CondConvCNNSize:
    """stem channels; stages as (out_channels, stride, blocks); expand ratio; head width;
    stem stride (2 halves the resolution before the blocks: 4x less compute)."""

    stem: int
    stages: tuple[tuple[int, int, int], ...]
    expand_ratio: int
    head: int
    stem_stride: int = 1


SIZES: dict[str, CondConvCNNSize] = {
    "tiny": CondConvCNNSize(8, ((16, 1, 1), (24, 2, 1), (32, 2, 1)), 2, 64, stem_stride=2),
    "small": CondConvCNNSize(16, ((16, 1, 1), (32, 2, 2), (64, 2, 2)), 4, 128, stem_stride=2),
    "base": CondConvCNNSize(32, ((32, 1, 2), (64, 2, 2), (128, 2, 3)), 4, 256, stem_stride=1),
}


class CondConvCNN(nn.Module):
    """Static stem -> CondConv inverted-residual stages -> 1x1 head -> GAP -> FC.

    forward(x: (B, C, H, W), targets: (B,) | None, routing_weights: (B, E) | None)
    -> ModelOutput. Each block routes from its own input unless ``own_routers`` is
    False, in which case one ``routing_weights`` vector drives every block (the
    BasisNet specialist: a combination of E basis networks).
    """

    def __init__(self, size: CondConvCNNSize, *, experts: int = 8, num_classes: int = 10,
                 in_channels: int = 1, own_routers: bool = True, dropout: float = 0.1,
                 router_dropout: float = 0.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if experts < 1:
            raise ValueError(f"experts must be >= 1, got {experts}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.experts = experts
        self.num_classes = num_classes
        self.own_routers = own_routers
        self.label_smoothing = label_smoothing
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, size.stem, 3, size.stem_stride, 1, bias=False), nn.BatchNorm2d(size.stem), nn.ReLU6(inplace=True)
        )
        blocks = []
        ch = size.stem
        for out_ch, stride, n in size.stages:
            for i in range(n):
                blocks.append(CondConvInvertedResidual(
                    ch, out_ch, stride=stride if i == 0 else 1, expand_ratio=size.expand_ratio,
                    num_experts=experts, own_router=own_routers, router_dropout=router_dropout,
                ))
                ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Conv2d(ch, size.head, 1, bias=False), nn.BatchNorm2d(size.head), nn.ReLU6(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(size.head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def features(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> pooled features (B, head)."""
        out = self.stem(x)
        for block in self.blocks:
            out = block(out, routing_weights)
        return self.head(out).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                routing_weights: torch.Tensor | None = None) -> ModelOutput:
        logits = self.classifier(self.dropout(self.features(x, routing_weights)))
        if targets is None:
            return ModelOutput(logits=logits)
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return ModelOutput(logits=logits, loss=ce, losses={"ce": ce.detach()})


@dataclass(frozen=True)
class CondConvCnnOptions:
    """condconv_cnn's options (job file: ``model.options``)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float = 0.1  # dropout before the classifier
    router_dropout: float = 0.0  # dropout on each block's routing-function input


@register_model("condconv_cnn", tuple(SIZES), options=CondConvCnnOptions)
def condconv_cnn(size: str, *, experts: int = 8, num_classes: int = 10, in_channels: int = 1,
                 options: CondConvCnnOptions = CondConvCnnOptions()) -> CondConvCNN:
    """CondConv network of E = ``experts`` kernels per routed convolution (1: the static baseline)."""
    return CondConvCNN(SIZES[size], experts=experts, num_classes=num_classes, in_channels=in_channels,
                       dropout=options.dropout, router_dropout=options.router_dropout)
