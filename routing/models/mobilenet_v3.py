"""MobileNetV3-Large / -Small (Howard et al., "Searching for MobileNetV3", ICCV 2019, arXiv 1905.02244).

Not a registered family: the BasisNet specialist and lightweight model
(basisnet_mobilenet_v3) and the CoE delegator and experts (coe_mobilenet) are
built here. Layout as published (and as timm's ``mobilenetv3_large_100`` /
``mobilenetv3_small_100`` define it; read for the architecture only): stem 3x3/2
to 16, hard-swish; inverted residual blocks (below) with squeeze-excite reduced
to make_divisible(expanded / 4, 8), ReLU, hard-sigmoid gate; final 1x1 conv
(960 / 576), GAP, head 1x1 conv with bias and no norm (1280 / 1024), hard-swish,
dropout, FC. Expanded widths are make_divisible(in x ratio, 8). Widths other
than 1.0 scale every channel count but the head (1280 / 1024) and keep the stem
at 16 (as the reference does for widths >= 0.75).

``experts > 1`` makes the convolutions of every block CondConv layers; with
``own_routers=False`` (BasisNet) all of them, plus the final and head 1x1
convolutions and the classifier when ``mix_head``, take ONE routing vector
passed to forward: the network is a combination of N whole basis networks.
"""

from __future__ import annotations

from ..cond_conv_block import CondConvInvertedResidual
from .mobilenet import Classifier, ConvNormAct, MobileNet, make_divisible

# (kernel, expand ratio, out channels, squeeze-excite, activation, stride)
LARGE: tuple[tuple[int, float, int, bool, str, int], ...] = (
    (3, 1, 16, False, "relu", 1),
    (3, 4, 24, False, "relu", 2), (3, 3, 24, False, "relu", 1),
    (5, 3, 40, True, "relu", 2), (5, 3, 40, True, "relu", 1), (5, 3, 40, True, "relu", 1),
    (3, 6, 80, False, "hard_swish", 2), (3, 2.5, 80, False, "hard_swish", 1),
    (3, 2.3, 80, False, "hard_swish", 1), (3, 2.3, 80, False, "hard_swish", 1),
    (3, 6, 112, True, "hard_swish", 1), (3, 6, 112, True, "hard_swish", 1),
    (5, 6, 160, True, "hard_swish", 2), (5, 6, 160, True, "hard_swish", 1), (5, 6, 160, True, "hard_swish", 1),
)
SMALL: tuple[tuple[int, float, int, bool, str, int], ...] = (
    (3, 1, 16, True, "relu", 2),
    (3, 4.5, 24, False, "relu", 2), (3, 3.67, 24, False, "relu", 1),
    (5, 4, 40, True, "hard_swish", 2), (5, 6, 40, True, "hard_swish", 1), (5, 6, 40, True, "hard_swish", 1),
    (5, 3, 48, True, "hard_swish", 1), (5, 3, 48, True, "hard_swish", 1),
    (5, 6, 96, True, "hard_swish", 2), (5, 6, 96, True, "hard_swish", 1), (5, 6, 96, True, "hard_swish", 1),
)
# variant -> (blocks, final conv width, head width)
VARIANTS = {"large": (LARGE, 960, 1280), "small": (SMALL, 576, 1024)}


def mobilenet_v3(variant: str, *, width: float = 1.0, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2, experts: int = 1, own_routers: bool = True, mix_head: bool = False,
                 label_smoothing: float = 0.0) -> MobileNet:
    """MobileNetV3 ``variant`` ('large' | 'small') at channel ``width``.

    experts > 1: CondConv blocks (own sigmoid routers, or the caller's weights when
    ``own_routers`` is False); ``mix_head`` also mixes the final conv, head conv and
    classifier (only with ``own_routers=False``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"MobileNetV3 variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if width <= 0:
        raise ValueError(f"MobileNetV3 width must be > 0, got {width}")
    if mix_head and own_routers:
        raise ValueError("mix_head needs own_routers=False (the head layers take the caller's routing weights)")
    spec, final_ch, head_ch = VARIANTS[variant]
    stem_ch = 16 if width >= 0.75 else make_divisible(16 * width)
    blocks, ch = [], stem_ch
    for k, ratio, c, se, act, stride in spec:
        out_ch = make_divisible(c * width)
        hidden = ch if ratio == 1 else make_divisible(ch * ratio)
        blocks.append(CondConvInvertedResidual(
            ch, out_ch, stride=stride, expand_ratio=ratio, hidden_channels=hidden, num_experts=experts,
            own_router=own_routers, kernel_size=k, activation=act,
            se_channels=make_divisible(hidden / 4) if se else 0, se_activation="relu", se_gate="hard_sigmoid",
        ))
        ch = out_ch
    final_ch = make_divisible(final_ch * width)
    head_e = experts if mix_head else 1
    return MobileNet(
        stem=ConvNormAct(in_channels, stem_ch, 3, stride=2, activation="hard_swish"),
        blocks=blocks,
        final=ConvNormAct(ch, final_ch, 1, activation="hard_swish", experts=head_e),
        head=ConvNormAct(final_ch, head_ch, 1, activation="hard_swish", norm=False, experts=head_e),
        classifier=Classifier(head_ch, num_classes, dropout=dropout, experts=head_e, own_router=False),
        label_smoothing=label_smoothing,
    )
