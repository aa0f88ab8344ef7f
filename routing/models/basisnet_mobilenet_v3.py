"""basisnet_mobilenet_v3: BasisNet-MobileNetV3 (ImageNet scale, 224x224 RGB).

Zhang et al., "BasisNet: Two-stage Model Synthesis for Efficient Inference",
CVPR 2021 workshops, arXiv 2105.03014. Paper figures: 80.3% top-1 at 290M
multiply-adds; with early termination 80.0% at 198M on average.

Built on :class:`condmoe.routing.basisnet.BasisNet` (lightweight model ->
softmax coefficients over N bases -> specialist synthesised in the single-
convolution CondConv form -> early exit on the lightweight confidence). The
paper's exact lightweight model and which specialist layers hold bases were not
available to us (no public code); our choices, each an option:

- specialist: MobileNetV3-Large 1.0x (arXiv 1905.02244) whose every block
  convolution (expand, depthwise, project), final 1x1 conv, head 1x1 conv and
  classifier are combinations of N = 8 basis kernels under ONE coefficient
  vector (the specialist is a combination of N whole basis networks, METHODS.md);
  the stem and the squeeze-excite convolutions stay static (as CondConv keeps SE
  static). 248M multiply-adds incl. the kernel mixing.
- lightweight model: MobileNetV3-Small 1.0x previewing the image downscaled to
  6/7 of its side (192x192 at 224; ``light_input_scale``), 42M; its pooled head
  features (1024) feed the coefficient FC and its classifier gives the early-exit
  prediction.
- total without exits: 290M with our counter (the paper's 290M); with early exit
  the average is light + coefficients + (1 - exit rate) x specialist: 198M is an
  exit rate of about 37%.

``experts=1`` builds the static MobileNetV3-Large (the baseline of the same
shape; no lightweight model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..basisnet import BasisNet, BasisNetConfig
from .mobilenet import MobileNet
from .mobilenet_v3 import mobilenet_v3
from .registry import config_kwargs, register_model

SIZES: tuple[str, ...] = ("large",)
LIGHT_INPUT_SCALE = 6 / 7  # 192x192 at 224x224


class MobileNetLight(nn.Module):
    """A MobileNet as BasisNet's lightweight model: (B, C, H, W) -> (logits (B, K), features (B, F)).

    input_scale < 1: the image is bilinearly downscaled first (the preview).
    """

    def __init__(self, net: MobileNet, input_scale: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < input_scale <= 1.0:
            raise ValueError(f"lightweight input_scale must be in (0, 1], got {input_scale}")
        self.net = net
        self.input_scale = input_scale
        self.out_features = net.classifier.fc.in_features  # a static network: its classifier is nn.Linear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_scale < 1.0:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        feats = self.net.features(x)
        return self.net.classifier(feats), feats


@dataclass(frozen=True)
class BasisNetMobileNetV3Options:
    """basisnet_mobilenet_v3's options (job file: ``model.options``); the first three shape the
    network, the rest are BasisNetConfig fields (shared/METHODS.md section 2)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float = 0.2  # dropout before the specialist's and the lightweight model's classifiers
    light_width: float = 1.0  # channel width of the MobileNetV3-Small lightweight model
    mix_head: bool = True  # the specialist's final conv, head conv and classifier are basis-combined too
    temperature: float = 1.0  # T of the basis-coefficient softmax
    light_loss_weight: float = 1.0  # lambda: weight of the lightweight model's own CE in the joint loss
    exit_threshold: float | None = None  # early exit when the lightweight max-softmax >= this (None: never)
    coefficient_dropout: float = 0.0  # probability of zeroing a coefficient while training, in [0, 1)
    distill_weight: float = 0.0  # weight of the KL of the lightweight head to the specialist's prediction
    distill_temperature: float = 2.0  # temperature of that distillation
    light_input_scale: float = LIGHT_INPUT_SCALE  # the lightweight model previews the image resized by this


@register_model("basisnet_mobilenet_v3", SIZES, options=BasisNetMobileNetV3Options)
def basisnet_mobilenet_v3(size: str, *, experts: int = 8, num_classes: int = 1000, in_channels: int = 3,
                          options: BasisNetMobileNetV3Options = BasisNetMobileNetV3Options()) -> nn.Module:
    """experts = N bases of the MobileNetV3-Large specialist (1: the static MobileNetV3-Large alone)."""
    if experts < 1:
        raise ValueError(f"basisnet_mobilenet_v3 experts must be >= 1, got {experts}")
    if experts == 1:
        return mobilenet_v3("large", num_classes=num_classes, in_channels=in_channels, dropout=options.dropout)
    config = BasisNetConfig(num_bases=experts, **config_kwargs(options, BasisNetConfig))
    specialist = mobilenet_v3("large", num_classes=num_classes, in_channels=in_channels, dropout=options.dropout,
                              experts=experts, own_routers=False, mix_head=options.mix_head)
    light = MobileNetLight(mobilenet_v3("small", width=options.light_width, num_classes=num_classes,
                                        in_channels=in_channels, dropout=options.dropout),
                           config.light_input_scale)
    return BasisNet(specialist, config, in_channels=in_channels, num_classes=num_classes, light=light)
