"""condconv_mobilenet_v1: CondConv-MobileNetV1 0.5x and 1.0x (ImageNet scale, 224x224 RGB).

Yang et al., "CondConv", arXiv 1904.04971, on MobileNetV1 (Howard et al., arXiv
1704.04861). Figures: MobileNetV1 0.5x about 149M multiply-adds, 63.8% ->
71.6% with CondConv at +27% inference cost; 1.0x 569M, 71.9% -> 75.8% at +22%
(the paper's abstract in its NeurIPS submission).

Layout: MobileNetV1 as published: stem 3x3/2 conv to 32 x width channels, then
13 depthwise-separable layers (3x3 depthwise -> BN -> ReLU6 -> 1x1 pointwise ->
BN -> ReLU6) with (channels, stride) (64,1) (128,2) (128,1) (256,2) (256,1)
(512,2) (512,1)x5 (1024,2) (1024,1), x width; GAP, dropout, FC.

CondConv placement (the paper's exact configuration was not available to us):
CondConv in the LAST SEVEN separable layers (7-13: the five 512-channel layers
at 14x14 and the two 1024-channel layers at 7x7, x width) and in the final
classification layer, with 32 experts, one sigmoid routing vector per layer
from its input (shared by its depthwise and pointwise convolution) and one for
the classifier from the pooled features. Evidence for this choice: with our
counter it costs +27.0% at 0.5x and +22.1% at 1.0x, the two increases the paper
reports; fewer layers or experts do not reach them. ``cond_layers``,
``cond_classifier`` and ``experts`` move the choice. ``experts=1``: the static
MobileNetV1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cond_conv_block import CondConvRouter
from .mobilenet import Classifier, ConvNormAct, MobileNet, make_divisible
from .registry import register_model

# (out channels, stride) of MobileNetV1's 13 separable layers at width 1.0
LAYERS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
SIZES: dict[str, float] = {"0.5x": 0.5, "1.0x": 1.0}


class SeparableConv(nn.Module):
    """MobileNetV1 layer: 3x3 depthwise -> BN -> ReLU6 -> 1x1 pointwise -> BN -> ReLU6.

    forward(x: (B, C_in, H, W), routing_weights: (B, E) | None) -> (B, C_out, H/stride, W/stride).
    With experts > 1 both convolutions are CondConv layers sharing one routing
    vector, computed from the layer input by its own router unless ``own_router`` is False.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, experts: int = 1, own_router: bool = True,
                 router_dropout: float = 0.0) -> None:
        super().__init__()
        self.experts = experts
        self.router = (CondConvRouter(in_ch, experts, dropout=router_dropout)
                       if experts > 1 and own_router else None)
        self.depthwise = ConvNormAct(in_ch, in_ch, 3, stride=stride, groups=in_ch, activation="relu6",
                                     experts=experts)
        self.pointwise = ConvNormAct(in_ch, out_ch, 1, activation="relu6", experts=experts)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        rw = self.router(x).weights if self.router is not None else routing_weights
        return self.pointwise(self.depthwise(x, rw), rw)


@dataclass(frozen=True)
class CondConvMobileNetV1Options:
    """condconv_mobilenet_v1's options (job file: ``model.options``)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float = 0.2  # dropout before the classifier
    cond_layers: int = 7  # how many final separable layers are CondConv (7: layers 7-13)
    cond_classifier: bool = True  # the classifier is a CondConv FC too (its own router)
    router_dropout: float = 0.0  # dropout on each layer's routing-function input


@register_model("condconv_mobilenet_v1", tuple(SIZES), options=CondConvMobileNetV1Options)
def condconv_mobilenet_v1(size: str, *, experts: int = 32, num_classes: int = 1000, in_channels: int = 3,
                          options: CondConvMobileNetV1Options = CondConvMobileNetV1Options()) -> MobileNet:
    """CondConv-MobileNetV1 with E = ``experts`` kernels per routed layer (default 32; 1: the static MobileNetV1)."""
    if experts < 1:
        raise ValueError(f"condconv_mobilenet_v1 experts must be >= 1, got {experts}")
    if not 0 <= options.cond_layers <= len(LAYERS):
        raise ValueError(f"condconv_mobilenet_v1 cond_layers must be in [0, {len(LAYERS)}], "
                         f"got {options.cond_layers}")
    width = SIZES[size]
    stem_ch = make_divisible(32 * width)
    layers, ch = [], stem_ch
    for i, (c, stride) in enumerate(LAYERS):
        out_ch = make_divisible(c * width)
        e = experts if i >= len(LAYERS) - options.cond_layers else 1
        layers.append(SeparableConv(ch, out_ch, stride=stride, experts=e, router_dropout=options.router_dropout))
        ch = out_ch
    return MobileNet(
        stem=ConvNormAct(in_channels, stem_ch, 3, stride=2, activation="relu6"),
        blocks=layers,
        classifier=Classifier(ch, num_classes, dropout=options.dropout,
                              experts=experts if options.cond_classifier else 1),
    )
