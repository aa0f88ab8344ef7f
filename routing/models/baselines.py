"""Static baselines the seed papers measure their conditional networks against.

- ``expert_cnn``: one CoE expert alone (coe_cnn's :class:`ExpertCNN`; CoE, arXiv 2107.03815,
  compares against a single expert and against a dense network of the same cost). ``options.width``
  scales every channel count, so a width can be chosen whose multiply-adds match CoE's
  delegator + one expert (the "dense network of the same cost").
- ``light_cnn``: BasisNet's lightweight model alone (basisnet_cnn's :class:`LightweightModel`
  of the same size; BasisNet, arXiv 2105.03014, reports it beside the synthesised specialist).

Neither routes: ``experts`` is accepted (every job names it) and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..basisnet import LightweightModel
from ..model_output import ModelOutput
from .basisnet_cnn import LIGHT_CHANNELS
from .coe_cnn import EXPERT_CHANNELS, ExpertCNN
from .registry import register_model


class Classifier(nn.Module):
    """A static network as a condmoe model: forward(x: (B, C, H, W), targets: (B,) | None) -> ModelOutput.

    ``body`` maps images to logits (B, K) (or to (logits, features), the first is used).
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.label_smoothing = 0.0

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        logits = self.body(x)
        if isinstance(logits, tuple):
            logits = logits[0]
        if targets is None:
            return ModelOutput(logits=logits)
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return ModelOutput(logits=logits, loss=ce, losses={"ce": ce.detach()})


@dataclass(frozen=True)
class ExpertCnnOptions:
    """expert_cnn's options (job file: ``model.options``)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    width: float = 1.0  # every channel count times this (> 0): a dense network of another cost
    dropout: float = 0.1  # dropout before the classifier
    norm: str = "batch"  # 'batch' | 'group' | 'none' after each convolution


@register_model("expert_cnn", tuple(EXPERT_CHANNELS), options=ExpertCnnOptions)
def expert_cnn(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int = 1,
               options: ExpertCnnOptions = ExpertCnnOptions()) -> Classifier:
    """One coe_cnn expert of ``size`` alone, channels scaled by ``options.width``."""
    if options.width <= 0:
        raise ValueError(f"expert_cnn width must be > 0, got {options.width}")
    channels = tuple(max(1, round(c * options.width)) for c in EXPERT_CHANNELS[size])
    return Classifier(ExpertCNN(channels, in_channels=in_channels, num_classes=num_classes,
                                dropout=options.dropout, norm=options.norm))


@dataclass(frozen=True)
class LightCnnOptions:
    """light_cnn's options (job file: ``model.options``)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    input_scale: float = 1.0  # the model sees the input resized by this factor, (0, 1]
    channels: tuple[int, ...] | None = None  # conv widths (None: basisnet_cnn's LIGHT_CHANNELS[size])


@register_model("light_cnn", tuple(LIGHT_CHANNELS), options=LightCnnOptions)
def light_cnn(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int = 1,
              options: LightCnnOptions = LightCnnOptions()) -> Classifier:
    """basisnet_cnn's lightweight model of ``size`` alone."""
    if not 0.0 < options.input_scale <= 1.0:
        raise ValueError(f"light_cnn input_scale must be in (0, 1], got {options.input_scale}")
    channels = tuple(options.channels or LIGHT_CHANNELS[size])
    return Classifier(LightweightModel(in_channels, num_classes, channels, options.input_scale))
