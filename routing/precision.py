"""Routing math in float32 when the network trains in bfloat16.

DeepSpeed's bf16 mode casts every parameter to bfloat16, whose 8-bit mantissa
resolves about 0.4% of a value: two experts whose router logits differ by less
than that tie, a sigmoid or softmax near saturation rounds to exactly 0 or 1,
and CIGT's information gain (entropies of batch-averaged route probabilities)
loses the small differences it maximises. So the routers compute their logits,
and everything after them (softmax / sigmoid, exit confidences, the
information-gain loss), in float32:

- :func:`fp32_linear` runs a linear layer in float32 with autocast off and
  returns float32; gradients reach the (bf16) parameters and input in their
  own dtypes. For float32 tensors it is exactly ``linear(x)``.
- :class:`Fp32Linear` is an ``nn.Linear`` whose forward is :func:`fp32_linear`.
  The routers hold one instead of an ``nn.Linear``: same parameters and
  state-dict keys, and still an ``nn.Linear`` for multiply-add counting
  (condmoe.routing.macs) and forward hooks.

The convolutions, experts and classifier heads stay in the training dtype.
DeepSpeed's own top-k gate (condmoe.routing.topk_moe) already computes its
logits from ``input.float()`` and ``wg.weight.float()``, and its gating in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fp32_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in float32 with autocast off.

    x: (..., in_features), any float dtype -> (..., out_features) float32.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias = None if linear.bias is None else linear.bias.float()
        return F.linear(x.float(), linear.weight.float(), bias)


class Fp32Linear(nn.Linear):
    """``nn.Linear`` that computes in float32 whatever the dtype of its parameters and input (router logits).

    forward(x: (..., in_features)) -> (..., out_features) float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_linear(self, x)
