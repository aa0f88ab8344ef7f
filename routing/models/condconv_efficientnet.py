"""condconv_efficientnet: CondConv-EfficientNet-B0/B1 (ImageNet scale, 224x224 / 240x240 RGB).

Yang, Bender, Le, Ngiam, "CondConv", NeurIPS 2019, arXiv 1904.04971, on
EfficientNet (Tan, Le, arXiv 1905.11946). Paper figures: CondConv-EfficientNet-B0
with 8 experts 413M multiply-adds, 24.0M parameters, 78.3% top-1; static B0 about
390M, 5.3M, 77.2%.

Layout (the reference implementations: TensorFlow's
tpu/models/official/efficientnet/condconv and timm's ``efficientnet_cc_b0_8e``,
read for the architecture only):

- EfficientNet-B0 stages as (kernel, stride, expand ratio, channels, repeats):
  (3,1,1,16,1) (3,2,6,24,2) (5,2,6,40,2) (3,2,6,80,3) (5,1,6,112,3) (5,2,6,192,4)
  (3,1,6,320,1); stem 3x3/2 to 32 channels, final 1x1 conv to 1280, GAP, dropout,
  FC. Swish everywhere; squeeze-excite in every block, reduced to a quarter of
  the block's INPUT channels, swish, sigmoid gate. B1 repeats each stage
  ceil(1.1 x) times (depth multiplier 1.1, 240x240 input), widths unchanged.
- CondConv only in the LAST THREE stages (112, 192, 320 channels: 3 + 4 + 1
  blocks at B0): their expand, depthwise and project convolutions are CondConv
  layers, one sigmoid routing vector per block computed from the block input
  (FC on its global average pool) and shared by the three; squeeze-excite stays
  static; stem, earlier stages, final conv and classifier stay static. That is
  the paper's "CondConv in the later layers" as both references build it
  (timm: ``cc4`` on those stages with experts_multiplier 2 = 8 experts).
  ``cond_stages`` moves the boundary (an option, since the paper's ablation
  varies it).
- ``experts=1`` builds the static EfficientNet of exactly the same shape.

Not built: drop-connect (stochastic depth) and TensorFlow's 'same' asymmetric
padding (PyTorch symmetric padding k // 2, as timm's non-``tf_`` models; same
multiply-adds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cond_conv_block import CondConvInvertedResidual
from .mobilenet import Classifier, ConvNormAct, MobileNet
from .registry import register_model

# (kernel, stride, expand ratio, out channels, repeats) per stage of EfficientNet-B0
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1),
)
# size -> (depth multiplier, native resolution, dropout)
SIZES: dict[str, tuple[float, int, float]] = {"b0": (1.0, 224, 0.2), "b1": (1.1, 240, 0.2)}


@dataclass(frozen=True)
class CondConvEfficientNetOptions:
    """condconv_efficientnet's options (job file: ``model.options``)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float | None = None  # dropout before the classifier (None: the size's, 0.2 at B0 and B1)
    cond_stages: int = 3  # how many final stages are CondConv (3: the references' 112/192/320 stages)
    router_dropout: float = 0.0  # dropout on each block's routing-function input


@register_model("condconv_efficientnet", tuple(SIZES), options=CondConvEfficientNetOptions)
def condconv_efficientnet(size: str, *, experts: int = 8, num_classes: int = 1000, in_channels: int = 3,
                          options: CondConvEfficientNetOptions = CondConvEfficientNetOptions()) -> MobileNet:
    """CondConv-EfficientNet with E = ``experts`` kernels per routed convolution (1: the static EfficientNet)."""
    if experts < 1:
        raise ValueError(f"condconv_efficientnet experts must be >= 1, got {experts}")
    if not 0 <= options.cond_stages <= len(B0_STAGES):
        raise ValueError(f"condconv_efficientnet cond_stages must be in [0, {len(B0_STAGES)}], "
                         f"got {options.cond_stages}")
    depth, _, default_dropout = SIZES[size]
    stem_ch = 32
    blocks = []
    ch = stem_ch
    first_cond = len(B0_STAGES) - options.cond_stages
    for s, (k, stride, ratio, out_ch, repeats) in enumerate(B0_STAGES):
        e = experts if s >= first_cond else 1
        for i in range(int(math.ceil(repeats * depth))):
            blocks.append(CondConvInvertedResidual(
                ch, out_ch, stride=stride if i == 0 else 1, expand_ratio=ratio, num_experts=e,
                router_dropout=options.router_dropout, kernel_size=k, activation="swish",
                se_channels=max(1, int(ch * 0.25)), se_gate="sigmoid",
            ))
            ch = out_ch
    dropout = default_dropout if options.dropout is None else options.dropout
    return MobileNet(
        stem=ConvNormAct(in_channels, stem_ch, 3, stride=2, activation="swish"),
        blocks=blocks,
        final=ConvNormAct(ch, 1280, 1, activation="swish"),
        classifier=Classifier(1280, num_classes, dropout=dropout),
    )
