"""CondConv: conditionally parameterised convolution.

Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized Convolutions for
Efficient Inference", NeurIPS 2019, arXiv 1904.04971.

The layer holds E expert kernels and takes per-example routing weights as an
argument: ``y = (sum_e alpha_e W_e) * x``. That equals ``sum_e alpha_e (W_e * x)``
but costs ONE convolution: the kernels are mixed per example and the batch is
folded into the channel groups of a single grouped convolution. Pointwise
convolutions (1x1, stride 1) use a batched matmul instead, measured faster
on CPU (benchmarks/routing.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .macs import conv2d_macs


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    if len(v) != 2 or any((not isinstance(i, int)) or i < 0 for i in v):
        raise ValueError(f"CondConv2d {name} must be a non-negative int or a pair of them, got {v!r}")
    return tuple(v)  # type: ignore[return-value]


class CondConv2d(nn.Module):
    """Conv2d with ``num_experts`` kernels mixed per example.

    weight: (E, C_out * C_in/groups * kh * kw); bias: (E, C_out) or None.
    forward(x: (B, C_in, H, W), routing_weights: (B, E)) -> (B, C_out, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"CondConv2d num_experts must be >= 1, got {num_experts}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"CondConv2d groups={groups} must divide in_channels={in_channels} "
                f"and out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.num_experts = num_experts
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.weight_shape)))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        # input bytes per grouped convolution call (see forward); 0 or huge = whole batch
        self.chunk_bytes = 4 << 20
        self.pointwise = (
            self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and groups == 1
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He normal, fan-out, on each expert's own kernel shape: initialising the whole
        # (E, ...) tensor at once would use a far too large fan and a too small scale.
        fan_out = self.out_channels // self.groups * math.prod(self.kernel_size)
        std = math.sqrt(2.0 / fan_out)
        with torch.no_grad():
            for e in range(self.num_experts):
                self.weight[e].normal_(0.0, std)
            if self.bias is not None:
                self.bias.zero_()

    def expert_weight(self, e: int) -> torch.Tensor:
        """Expert ``e``'s kernel as a Conv2d weight (C_out, C_in/groups, kh, kw)."""
        return self.weight[e].view(self.weight_shape)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"CondConv2d expected {self.in_channels} input channels, got {c}")
        if routing_weights.shape != (b, self.num_experts):
            raise ValueError(
                f"CondConv2d routing_weights must be (B={b}, E={self.num_experts}), "
                f"got {tuple(routing_weights.shape)}"
            )
        rw = routing_weights.to(x.dtype)
        mixed = rw @ self.weight  # (B, C_out * C_in/g * kh * kw): the kernel mixing
        bias = rw @ self.bias if self.bias is not None else None  # (B, C_out)
        if self.pointwise:
            xm = x.reshape(b, c, h * w)
            wm = mixed.view(b, self.out_channels, c)
            y = torch.bmm(wm, xm) if bias is None else torch.baddbmm(bias.unsqueeze(-1), wm, xm)
            return y.view(b, self.out_channels, h, w)
        # fold the batch into groups: one grouped convolution computes every example
        # with its own mixed kernel. Large batches go in chunks of about chunk_bytes of
        # input: measured on CPU (benchmarks/routing.py) a cache-sized chunk runs the
        # grouped convolution up to 1.6x faster than the whole batch at once. On a GPU one call
        # for the whole batch (chunks would only add kernel launches).
        n = max(1, min(b, self.chunk_bytes // max(1, c * h * w * x.element_size())))
        if n >= b or x.device.type != "cpu":
            return self._grouped_conv(x, mixed, bias)
        return torch.cat([
            self._grouped_conv(x[s : s + n], mixed[s : s + n], None if bias is None else bias[s : s + n])
            for s in range(0, b, n)
        ])

    def _grouped_conv(self, x: torch.Tensor, mixed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One grouped conv2d: x (b, C_in, H, W) with per-example kernels mixed (b, K) -> (b, C_out, H', W')."""
        b, c, h, w = x.shape
        y = F.conv2d(
            x.reshape(1, b * c, h, w),
            mixed.reshape(b * self.out_channels, *self.weight_shape[1:]),
            bias.reshape(-1) if bias is not None else None,
            self.stride,
            self.padding,
            self.dilation,
            b * self.groups,
        )
        return y.view(b, self.out_channels, y.shape[-2], y.shape[-1])

    def macs(self, inputs: tuple, output: torch.Tensor) -> int:
        """Convolution + kernel mixing (E x kernel size per example, bias included)."""
        b = output.shape[0]
        mixing = b * self.num_experts * (self.weight.shape[1] + (self.out_channels if self.bias is not None else 0))
        conv = conv2d_macs(
            None, output, in_channels=self.in_channels, kernel_size=self.kernel_size, groups=self.groups
        )
        return conv + mixing

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, num_experts={self.num_experts}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


def naive_cond_conv2d(layer: CondConv2d, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    """Reference form: E separate convolutions, weighted and summed. (B, C_out, H', W').

    Costs E convolutions; used by the tests and the benchmark to check the layer.
    """
    out = None
    for e in range(layer.num_experts):
        y = F.conv2d(
            x,
            layer.expert_weight(e),
            layer.bias[e] if layer.bias is not None else None,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        y = routing_weights[:, e].view(-1, 1, 1, 1).to(y.dtype) * y
        out = y if out is None else out + y
    return out
