"""coe_cnn: CoE (arXiv 2107.03815) with a small strided-CNN delegator and E CNN experts of one size.

Every expert is a whole image classifier of the named size (the "dense network
of size S" CoE is compared against is one such expert, :class:`ExpertCNN`).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ..coe import CoE, CoEConfig, Delegator, make_norm
from .registry import register_model

# expert conv channels (strides 2, 2, 1); delegator channels (all stride 2)
EXPERT_CHANNELS = {"tiny": (16, 32, 64), "small": (32, 64, 128), "base": (48, 96, 192)}
DELEGATOR_CHANNELS = {"tiny": (16, 32), "small": (16, 32), "base": (16, 32, 64)}


class ExpertCNN(nn.Module):
    """(B, C, H, W) -> (B, num_classes): 3x3 conv / norm / ReLU stages (strides 2, 2, then 1), GAP, FC."""

    def __init__(self, channels: tuple[int, ...], *, in_channels: int, num_classes: int, dropout: float = 0.1,
                 norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for i, out_ch in enumerate(channels):
            layers += [nn.Conv2d(ch, out_ch, 3, 2 if i < 2 else 1, 1, bias=False), make_norm(norm, out_ch),
                       nn.ReLU(inplace=True)]
            ch = out_ch
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.body(x).mean(dim=(2, 3))))


@register_model("coe_cnn", tuple(EXPERT_CHANNELS))
def coe_cnn(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int = 4, ep_size: int = 1,
            dropout: float = 0.1, norm: str = "batch", delegator_scale: float = 1.0, seed: int | None = None,
            **coe_options) -> CoE:
    """experts = E; other options are CoEConfig fields (exit_threshold, wgm_floor, lgm, vcm, ...).

    norm: 'batch' | 'group' | 'none' in delegator and experts ('group' makes every
    sample's output independent of the rest of its batch). seed: expert
    initialisation seed (default: drawn from torch's global generator). delegator_scale:
    the delegator sees the image downscaled by this factor (1: full resolution).
    """
    config = CoEConfig(num_experts=experts, ep_size=ep_size, **coe_options)
    make_expert = partial(ExpertCNN, EXPERT_CHANNELS[size], in_channels=in_channels, num_classes=num_classes,
                          dropout=dropout, norm=norm)
    delegator = Delegator(in_channels, num_classes, experts, DELEGATOR_CHANNELS[size],
                          learned_vcm=config.vcm == "learned", norm=norm, input_scale=delegator_scale)
    return CoE(delegator, make_expert, config, num_classes=num_classes, seed=seed)
