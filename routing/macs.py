"""Multiply-add accounting, counted the way the conditional-computation papers count.

The count is of work actually executed in one forward pass, divided by the
batch size, so conditional execution is averaged the papers' way: a router or
a lightweight model that runs on every sample is counted for every sample, an
expert or specialist that runs only on the samples routed to it (or that did
not exit early) only for those. Counted: convolutions and fully-connected
layers (including routing FCs), and whatever a module declares through a
``macs(inputs, output) -> int`` method (CondConv's kernel mixing, grouped
expert matmuls). Batch norm, activations and pooling are not counted, as in
the papers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn


def conv2d_macs(conv: nn.Conv2d | None, output: torch.Tensor, *, in_channels: int | None = None,
                kernel_size: tuple[int, int] | None = None, groups: int | None = None) -> int:
    """Multiply-adds of a 2-d convolution producing ``output`` (B, C_out, H, W).

    Each output element costs (C_in / groups) * kh * kw multiply-adds.
    """
    c_in = in_channels if in_channels is not None else conv.in_channels
    kh, kw = kernel_size if kernel_size is not None else conv.kernel_size
    g = groups if groups is not None else conv.groups
    return int(output.numel()) * (c_in // g) * kh * kw


def linear_macs(linear: nn.Linear, output: torch.Tensor) -> int:
    """Multiply-adds of a fully connected layer: in_features per output element."""
    return int(output.numel()) * linear.in_features


@dataclass(frozen=True)
class MacsReport:
    """Multiply-adds of one forward, per sample of the batch.

    per_sample: total multiply-adds / batch size.
    by_module: {module name: its multiply-adds / batch size}.
    batch_size: B of the measured batch.
    """

    per_sample: float
    by_module: dict[str, float]
    batch_size: int

    def __str__(self) -> str:
        return f"{self.per_sample / 1e6:.3f}M MAdds/sample"


def _module_macs(module: nn.Module, inputs: tuple, output) -> int:
    if hasattr(module, "macs") and callable(module.macs):
        return int(module.macs(inputs, output))
    if isinstance(module, nn.Conv2d):
        return conv2d_macs(module, output)
    if isinstance(module, nn.Linear):
        return linear_macs(module, output)
    return 0


@torch.no_grad()
def count_macs(model: nn.Module, *args, **kwargs) -> MacsReport:
    """Run ``model(*args, **kwargs)`` once in eval mode and count its multiply-adds.

    The batch size is read from the first positional tensor argument (B, ...).
    """
    batch = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if batch is None:
        raise ValueError("count_macs needs the input batch as a positional tensor argument")
    counts: dict[str, int] = defaultdict(int)
    handles = []
    for name, module in model.named_modules():
        def hook(mod, inputs, output, _name=name):
            counts[_name or "root"] += _module_macs(mod, inputs, output)
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    b = int(batch.shape[0])
    by_module = {k: v / b for k, v in counts.items() if v}
    return MacsReport(per_sample=sum(by_module.values()), by_module=by_module, batch_size=b)
