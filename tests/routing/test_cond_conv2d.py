"""CondConv2d against plain references: nn.Conv2d and the naive sum of E convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condmoe.routing.cond_conv2d import CondConv2d, naive_cond_conv2d

CASES = [
    # in, out, kernel, stride, padding, dilation, groups, bias
    (6, 4, 3, 1, 1, 1, 1, True),
    (6, 4, 3, 2, 0, 1, 1, False),
    (6, 6, 3, 1, 2, 2, 1, True),
    (6, 4, 3, 1, 1, 1, 2, True),
    (6, 6, 3, 2, 1, 1, 6, False),  # depthwise
    (6, 8, 1, 1, 0, 1, 1, True),  # pointwise: batched-matmul path
    (6, 8, 1, 2, 0, 1, 1, False),  # strided 1x1: conv path
    (4, 4, (3, 5), (1, 2), (1, 2), 1, 1, True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("experts", [1, 3])
def test_mixed_conv_equals_sum_of_expert_convs(case, experts):
    torch.manual_seed(0)
    cin, cout, k, s, p, d, g, bias = case
    layer = CondConv2d(cin, cout, k, s, p, d, g, bias, num_experts=experts).double()
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(5, cin, 9, 10, dtype=torch.float64, requires_grad=True)
    rw = torch.rand(5, experts, dtype=torch.float64, requires_grad=True)
    y = layer(x, rw)
    ref = naive_cond_conv2d(layer, x, rw)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)

    # gradients w.r.t. input, routing weights, kernels and bias agree with the naive form
    g_out = torch.randn_like(y)
    params = [x, rw, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(y, params, g_out)
    grads_ref = torch.autograd.grad(ref, params, g_out)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_one_expert_weight_one_equals_conv2d(case):
    torch.manual_seed(1)
    cin, cout, k, s, p, d, g, bias = case
    layer = CondConv2d(cin, cout, k, s, p, d, g, bias, num_experts=1).double()
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias).double()
    with torch.no_grad():
        conv.weight.copy_(layer.expert_weight(0))
        if bias:
            layer.bias.normal_()
            conv.bias.copy_(layer.bias[0])
    x = torch.randn(3, cin, 11, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x, torch.ones(3, 1, dtype=torch.float64)), conv(x), rtol=1e-12, atol=1e-12)


def test_each_example_gets_its_own_kernel():
    torch.manual_seed(2)
    layer = CondConv2d(3, 4, 3, padding=1, num_experts=2).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    rw = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = layer(x, rw)
    torch.testing.assert_close(y[0:1], F.conv2d(x[0:1], layer.expert_weight(0), layer.bias[0], padding=1))
    torch.testing.assert_close(y[1:2], F.conv2d(x[1:2], layer.expert_weight(1), layer.bias[1], padding=1))


def test_per_expert_he_init_scale():
    torch.manual_seed(3)
    layer = CondConv2d(64, 64, 3, num_experts=8)
    expected = (2.0 / (64 * 9)) ** 0.5  # He normal, fan-out of ONE expert's kernel
    for e in range(8):
        assert abs(layer.weight[e].std().item() - expected) / expected < 0.05


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(in_channels=6, out_channels=4, kernel_size=3, groups=4), "groups=4"),
        (dict(in_channels=6, out_channels=4, kernel_size=3, num_experts=0), "num_experts"),
        (dict(in_channels=6, out_channels=4, kernel_size=-1), "kernel_size"),
    ],
)
def test_bad_construction_names_the_problem(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        CondConv2d(**kwargs)


def test_bad_routing_weights_shape_is_a_clear_error():
    layer = CondConv2d(3, 4, 3, num_experts=4)
    with pytest.raises(ValueError, match=r"routing_weights must be \(B=2, E=4\)"):
        layer(torch.randn(2, 3, 8, 8), torch.rand(2, 3))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        layer(torch.randn(2, 5, 8, 8), torch.rand(2, 4))


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 6 * 9 * 10 * 8, 3 * 6 * 9 * 10 * 8])
def test_batch_chunks_give_the_same_result(chunk_bytes):
    # chunks of 1, 2 and 3 examples (5 is not a multiple), forward and gradients
    torch.manual_seed(4)
    layer = CondConv2d(6, 6, 3, 2, 1, 1, 3, True, num_experts=3).double()
    nn.init.normal_(layer.bias)
    layer.chunk_bytes = chunk_bytes
    x = torch.randn(5, 6, 9, 10, dtype=torch.float64, requires_grad=True)
    rw = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x, rw)
    ref = naive_cond_conv2d(layer, x, rw)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, rw, layer.weight, layer.bias], g),
                    torch.autograd.grad(ref, [x, rw, layer.weight, layer.bias], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
