"""basisnet_cnn: BasisNet (arXiv 2105.03014) whose specialist is a condconv_cnn of N bases.

The specialist has the condconv_cnn shape of the same size, its blocks driven
by ONE coefficient vector from the lightweight model instead of per-block routers.
"""

from __future__ import annotations

from ..basisnet import BasisNet, BasisNetConfig
from .condconv_cnn import SIZES, CondConvCNN
from .registry import register_model

LIGHT_CHANNELS = {"tiny": (8, 16, 32), "small": (16, 32, 64), "base": (24, 48, 96)}


@register_model("basisnet_cnn", tuple(SIZES))
def basisnet_cnn(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int = 8,
                 dropout: float = 0.1, **basis_options) -> BasisNet:
    """experts = N bases; other options are BasisNetConfig fields (temperature, exit_threshold, ...)."""
    basis_options.setdefault("light_channels", LIGHT_CHANNELS[size])
    config = BasisNetConfig(num_bases=experts, **basis_options)
    specialist = CondConvCNN(SIZES[size], experts=experts, num_classes=num_classes, in_channels=in_channels,
                             own_routers=False, dropout=dropout)
    return BasisNet(specialist, config, in_channels=in_channels, num_classes=num_classes)
