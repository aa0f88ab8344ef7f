"""Tiny registered networks for trainer tests: a soft-routed CNN and a deepspeed.moe CNN.

They follow the model contract (forward(x, targets) -> ModelOutput, routed
layers record RoutingStats) and are small enough for many DeepSpeed runs on 2 cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condmoe.routing import ModelOutput, RoutedModule, RoutingStats, list_models, register_model


class SoftMix(RoutedModule):
    """Soft routing over E linear experts: (B, D) -> (B, D)."""

    def __init__(self, dim: int, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = nn.Parameter(torch.randn(experts, dim, dim) * dim ** -0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.router(h))
        self.record_stats(RoutingStats.from_load(w.sum(0), h.shape[0], kind="soft"))
        return torch.einsum("be,edk,bd->bk", w, self.experts, h)


class TinyCNN(nn.Module):
    label_smoothing: float = 0.0  # optim.label_smoothing reaches it through build_model

    def __init__(self, experts: int, num_classes: int, in_channels: int, ep_size: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 7 * 7, 32)
        if ep_size:
            from deepspeed.moe.layer import MoE
            self.moe = MoE(hidden_size=32, expert=nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
                           num_experts=experts, ep_size=ep_size, k=1, capacity_factor=4.0,
                           eval_capacity_factor=4.0, min_capacity=4)
            self.mix = None
        else:
            self.moe = None
            self.mix = SoftMix(32, experts)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        h = F.relu(self.fc(h.flatten(1)))
        aux = torch.zeros(())
        if self.moe is not None:
            y, aux, _ = self.moe(h.unsqueeze(1))
            h = h + y.squeeze(1)
        else:
            h = h + self.mix(h)
        logits = self.head(h)
        if targets is None:
            return ModelOutput(logits=logits)
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        loss = ce + 0.01 * aux
        return ModelOutput(logits=logits, loss=loss, losses={"ce": ce, "aux": aux})


if "test_soft_cnn" not in list_models():
    @register_model("test_soft_cnn", ("tiny",))
    def _soft(size, *, experts=4, num_classes=10, in_channels=1):
        return TinyCNN(experts, num_classes, in_channels)

    @register_model("test_moe_cnn", ("tiny",))
    def _moe(size, *, experts=4, num_classes=10, in_channels=1, ep_size=1):
        return TinyCNN(experts, num_classes, in_channels, ep_size=ep_size)
