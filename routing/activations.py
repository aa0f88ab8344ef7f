"""Activations by name, as the mobile network papers use them.

ReLU / ReLU6 (MobileNetV1/V2, arXiv 1704.04861, 1801.04381), swish = SiLU
(EfficientNet, arXiv 1905.11946), hard-swish and hard-sigmoid (MobileNetV3,
arXiv 1905.02244). Named so that block specifications stay plain data.
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS: tuple[str, ...] = ("relu", "relu6", "swish", "hard_swish", "sigmoid", "hard_sigmoid", "identity")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "swish":
        return nn.SiLU(inplace=True)
    if name == "hard_swish":
        return nn.Hardswish(inplace=True)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "hard_sigmoid":
        return nn.Hardsigmoid()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; one of {', '.join(ACTIVATIONS)}")
