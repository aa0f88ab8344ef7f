"""condconv_mobilenet_v2: CondConv-MobileNetV2 1.0x (ImageNet scale, 224x224 RGB).

Yang et al., "CondConv", arXiv 1904.04971, on MobileNetV2 (Sandler et al., arXiv
1801.04381). Figures: static MobileNetV2 1.0x 300M multiply-adds, 3.4-3.5M
parameters, 72.0%; CondConv-MobileNetV2 1.0x 329M, 74.6% (as tabulated in
BasisNet, arXiv 2105.03014, Table 1).

Layout: MobileNetV2 as published: stem 3x3/2 to 32, inverted residual stages
(t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2)
(6,320,1,1) (the t=1 block has no expand convolution), final 1x1 conv to 1280,
GAP, dropout 0.2, FC; ReLU6; widths rounded to multiples of 8.

CondConv placement (the paper's text says CondConv replaces the convolutions of
the later layers, and the final fully connected layer; the exact cut for
MobileNetV2 was not available to us): our choice is the LAST THREE stages (96,
160, 320 channels; the same cut TensorFlow's and timm's CondConv-EfficientNet
make: the second half of stride 16 and stride 32) plus the classifier, 8 experts,
one sigmoid routing vector per block from its input (and one for the classifier
from the pooled features). It measures 324M multiply-adds with our counter,
which counts about 1.5% below the papers (METHODS.md: EfficientNet-B0 386M vs
391M), i.e. the 329M the paper reports. ``cond_stages`` and
``cond_classifier`` move the choice. ``experts=1``: the static MobileNetV2.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cond_conv_block import CondConvInvertedResidual
from .mobilenet import Classifier, ConvNormAct, MobileNet, make_divisible
from .registry import register_model

# (expand ratio t, out channels c, repeats n, stride s) of MobileNetV2
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
SIZES: dict[str, float] = {"1.0x": 1.0}


@dataclass(frozen=True)
class CondConvMobileNetV2Options:
    """condconv_mobilenet_v2's options (job file: ``model.options``)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float = 0.2  # dropout before the classifier
    cond_stages: int = 3  # how many final stages are CondConv (3: the 96/160/320-channel stages)
    cond_classifier: bool = True  # the classifier is a CondConv FC too (its own router)
    router_dropout: float = 0.0  # dropout on each block's routing-function input


@register_model("condconv_mobilenet_v2", tuple(SIZES), options=CondConvMobileNetV2Options)
def condconv_mobilenet_v2(size: str, *, experts: int = 8, num_classes: int = 1000, in_channels: int = 3,
                          options: CondConvMobileNetV2Options = CondConvMobileNetV2Options()) -> MobileNet:
    """CondConv-MobileNetV2 with E = ``experts`` kernels per routed layer (1: the static MobileNetV2)."""
    if experts < 1:
        raise ValueError(f"condconv_mobilenet_v2 experts must be >= 1, got {experts}")
    if not 0 <= options.cond_stages <= len(STAGES):
        raise ValueError(f"condconv_mobilenet_v2 cond_stages must be in [0, {len(STAGES)}], "
                         f"got {options.cond_stages}")
    width = SIZES[size]
    stem_ch = make_divisible(32 * width)
    blocks, ch = [], stem_ch
    first_cond = len(STAGES) - options.cond_stages
    for s, (t, c, n, stride) in enumerate(STAGES):
        out_ch = make_divisible(c * width)
        e = experts if s >= first_cond else 1
        for i in range(n):
            blocks.append(CondConvInvertedResidual(ch, out_ch, stride=stride if i == 0 else 1, expand_ratio=t,
                                                   num_experts=e, router_dropout=options.router_dropout,
                                                   activation="relu6"))
            ch = out_ch
    last = max(1280, make_divisible(1280 * width))
    return MobileNet(
        stem=ConvNormAct(in_channels, stem_ch, 3, stride=2, activation="relu6"),
        blocks=blocks,
        final=ConvNormAct(ch, last, 1, activation="relu6"),
        classifier=Classifier(last, num_classes, dropout=options.dropout,
                              experts=experts if options.cond_classifier else 1),
    )
