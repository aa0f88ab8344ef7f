"""basisnet_cnn: BasisNet (arXiv 2105.03014) whose specialist is a condconv_cnn of N bases.

The specialist has the condconv_cnn shape of the same size, its blocks driven
by ONE coefficient vector from the lightweight model instead of per-block routers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..basisnet import BasisNet, BasisNetConfig
from .condconv_cnn import SIZES, CondConvCNN
from .registry import config_kwargs, register_model

LIGHT_CHANNELS = {"tiny": (8, 16, 32), "small": (16, 32, 64), "base": (24, 48, 96)}


@dataclass(frozen=True)
class BasisNetCnnOptions:
    """basisnet_cnn's options (job file: ``model.options``); all but ``dropout`` are BasisNetConfig fields."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float = 0.1  # the specialist's dropout before its classifier
    temperature: float = 1.0  # T of the basis-coefficient softmax
    light_loss_weight: float = 1.0  # lambda: weight of the lightweight model's own CE in the joint loss
    exit_threshold: float | None = None  # early exit when the lightweight max-softmax >= this (None: never)
    coefficient_dropout: float = 0.0  # probability of zeroing a coefficient while training, in [0, 1)
    distill_weight: float = 0.0  # weight of the KL of the lightweight head to the specialist's prediction
    distill_temperature: float = 2.0  # temperature of that distillation
    light_input_scale: float = 1.0  # the lightweight model sees the input resized by this factor, (0, 1]
    light_channels: tuple[int, ...] | None = None  # lightweight conv widths (None: LIGHT_CHANNELS[size])


@register_model("basisnet_cnn", tuple(SIZES), options=BasisNetCnnOptions)
def basisnet_cnn(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int = 8,
                 options: BasisNetCnnOptions = BasisNetCnnOptions()) -> BasisNet:
    """experts = N bases; the specialist is a condconv_cnn of the same size."""
    basis = config_kwargs(options, BasisNetConfig)
    basis["light_channels"] = tuple(options.light_channels or LIGHT_CHANNELS[size])
    config = BasisNetConfig(num_bases=experts, **basis)
    specialist = CondConvCNN(SIZES[size], experts=experts, num_classes=num_classes, in_channels=in_channels,
                             own_routers=False, dropout=options.dropout)
    return BasisNet(specialist, config, in_channels=in_channels, num_classes=num_classes)
