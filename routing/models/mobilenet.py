"""Shared skeleton of the ImageNet-scale mobile families (MobileNetV1/V2/V3, EfficientNet).

Not a registered family itself: condconv_efficientnet, condconv_mobilenet_v1/v2,
basisnet_mobilenet_v3 and coe_mobilenet assemble their networks from these parts.
A network is ``stem -> blocks -> [final 1x1 conv] -> GAP -> [head 1x1 conv] ->
dropout -> classifier``, where any convolution may be a CondConv layer:

- with its own router (CondConv, Yang et al. arXiv 1904.04971: one sigmoid
  routing vector per block from the block input), or
- driven by ONE routing vector passed to ``forward`` (the BasisNet specialist,
  Zhang et al. arXiv 2105.03014: a combination of N whole basis networks).

Channel rounding follows the MobileNet reference code (``make_divisible``, also
used by timm and torchvision), so the widths, parameter counts and
multiply-adds match the published networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import make_activation
from ..cond_conv2d import CondConv2d
from ..cond_conv_block import CondConvRouter
from ..model_output import ModelOutput


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``), never
    more than 10% below it: the MobileNet reference code's channel rounding."""
    min_value = min_value or divisor
    out = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if out < 0.9 * value:
        out += divisor
    return out


def cond_or_static_conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1,
                        experts: int = 1, bias: bool = False) -> nn.Module:
    """nn.Conv2d for ``experts == 1``, else a CondConv2d of the same shape ('same' padding k // 2)."""
    if experts == 1:
        return nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=bias)
    return CondConv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=bias, num_experts=experts)


class ConvNormAct(nn.Module):
    """kxk convolution (CondConv when experts > 1) -> [BatchNorm] -> activation.

    forward(x: (B, C_in, H, W), routing_weights: (B, E) | None) -> (B, C_out, H/stride, W/stride).
    A CondConv layer routes itself when ``own_router`` (sigmoid router on its input),
    else takes the caller's weights.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, *, stride: int = 1, groups: int = 1,
                 activation: str = "relu", norm: bool = True, experts: int = 1, own_router: bool = False,
                 bias: bool | None = None) -> None:
        super().__init__()
        self.experts = experts
        self.conv = cond_or_static_conv(in_ch, out_ch, kernel, stride=stride, groups=groups, experts=experts,
                                        bias=(not norm) if bias is None else bias)
        self.bn = nn.BatchNorm2d(out_ch) if norm else nn.Identity()
        self.act = make_activation(activation)
        self.router = CondConvRouter(in_ch, experts) if own_router and experts > 1 else None

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.experts == 1:
            return self.act(self.bn(self.conv(x)))
        rw = self.router(x).weights if self.router is not None else routing_weights
        if rw is None:
            raise ValueError("this CondConv layer has no router: pass routing_weights (B, E)")
        return self.act(self.bn(self.conv(x, rw)))


class Classifier(nn.Module):
    """Dropout -> fully connected layer; a CondConv FC (1x1 CondConv2d with bias) when experts > 1.

    forward(features: (B, F), routing_weights: (B, E) | None) -> logits (B, K). The CondConv
    form routes itself from the pooled features when ``own_router`` (CondConv's classifier,
    arXiv 1904.04971), else takes the caller's weights (BasisNet).
    """

    def __init__(self, in_features: int, num_classes: int, *, dropout: float = 0.0, experts: int = 1,
                 own_router: bool = True) -> None:
        super().__init__()
        self.experts = experts
        self.dropout = nn.Dropout(dropout)
        if experts == 1:
            self.fc: nn.Module = nn.Linear(in_features, num_classes)
            self.router = None
        else:
            self.fc = CondConv2d(in_features, num_classes, 1, bias=True, num_experts=experts)
            self.router = CondConvRouter(in_features, experts) if own_router else None

    def forward(self, features: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.experts == 1:
            return self.fc(self.dropout(features))
        rw = self.router(features).weights if self.router is not None else routing_weights
        if rw is None:
            raise ValueError("this CondConv classifier has no router: pass routing_weights (B, E)")
        return self.fc(self.dropout(features)[:, :, None, None], rw).flatten(1)


class MobileNet(nn.Module):
    """stem -> blocks -> [final] -> GAP -> [head] -> classifier, every part taking optional routing weights.

    forward(x: (B, C, H, W), targets: (B,) | None, routing_weights: (B, E) | None) -> ModelOutput.
    ``routing_weights`` (BasisNet's coefficients) reach every block and layer that has
    no router of its own; static layers ignore them.
    features(x, routing_weights) -> pooled features (B, F) (after the head convolution).
    """

    def __init__(self, *, stem: nn.Module, blocks: Sequence[nn.Module], classifier: Classifier,
                 final: nn.Module | None = None, head: nn.Module | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.final = final
        self.head = head
        self.classifier = classifier
        self.label_smoothing = label_smoothing
        self._init_weights()

    def _init_weights(self) -> None:
        # as the MobileNet/EfficientNet references: convolutions He normal, fan-out (CondConv2d
        # inits its experts one by one itself), zero biases; a static classifier uniform
        # (+-1/sqrt(classes)). Routing FCs keep PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        fc = self.classifier.fc
        if isinstance(fc, nn.Linear):
            r = 1.0 / fc.out_features**0.5
            nn.init.uniform_(fc.weight, -r, r)
            nn.init.zeros_(fc.bias)

    def features(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        out = self.stem(x)
        for block in self.blocks:
            out = block(out, routing_weights)
        if self.final is not None:
            out = self.final(out, routing_weights)
        out = out.mean(dim=(2, 3), keepdim=True)
        if self.head is not None:
            out = self.head(out, routing_weights)
        return out.flatten(1)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                routing_weights: torch.Tensor | None = None) -> ModelOutput:
        logits = self.classifier(self.features(x, routing_weights), routing_weights)
        if targets is None:
            return ModelOutput(logits=logits)
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return ModelOutput(logits=logits, loss=ce, losses={"ce": ce.detach()})


class Logits(nn.Module):
    """Adapter: a ModelOutput network as a plain (B, C, H, W) -> logits (B, K) module (a CoE expert)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).logits
