"""Routed layers on CUDA (marker gpu; skipped without CUDA).

Tolerances, relative to the largest magnitude of the fp32 reference output:

- CondConv2d's grouped-convolution form vs the naive sum of E convolutions, float32 with TF32
  off: 1e-4 (the two sum the same products in different orders).
- the same in bfloat16, both forms against the float32 naive sum: 3e-2 (bf16 keeps 8 bits of
  mantissa, ~4e-3 per rounding; the kernel mixing, the convolution's accumulation and the
  output each round once or more), and the two bf16 forms agree with each other to 3e-2.
"""

from __future__ import annotations

import pytest
import torch

from condmoe.routing import CondConv2d, build_model
from condmoe.routing.cigt import run_routed
from condmoe.routing.cond_conv2d import naive_cond_conv2d
from condmoe.routing.precision import Fp32Linear

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)
FP32_TOL, BF16_TOL = 1e-4, 3e-2


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


LAYERS = [  # in, out, kernel, stride, groups, experts
    (16, 32, 3, 1, 1, 4), (32, 32, 3, 2, 32, 8), (24, 48, 1, 1, 1, 8), (16, 16, 5, 1, 16, 16), (32, 64, 3, 1, 1, 8)]


@pytest.mark.parametrize("cin, cout, k, stride, groups, experts", LAYERS)
def test_cond_conv2d_grouped_form_equals_naive_sum_on_cuda(no_tf32, cin, cout, k, stride, groups, experts):
    torch.manual_seed(0)
    layer = CondConv2d(cin, cout, k, stride, k // 2, groups=groups, num_experts=experts).to(CUDA)
    x = torch.randn(24, cin, 14, 14, device=CUDA, requires_grad=True)
    rw = torch.sigmoid(torch.randn(24, experts, device=CUDA))
    ref = naive_cond_conv2d(layer, x, rw)
    y = layer(x, rw)
    assert _rel(y, ref) <= FP32_TOL
    # gradients of the one grouped conv == those of the E summed convolutions
    g = torch.randn_like(ref)
    gw, gx = torch.autograd.grad((y * g).sum(), (layer.weight, x), retain_graph=False)
    x2 = x.detach().clone().requires_grad_(True)
    gw_ref, gx_ref = torch.autograd.grad((naive_cond_conv2d(layer, x2, rw) * g).sum(), (layer.weight, x2))
    assert _rel(gw, gw_ref) <= FP32_TOL and _rel(gx, gx_ref) <= FP32_TOL

    layer16 = CondConv2d(cin, cout, k, stride, k // 2, groups=groups, num_experts=experts).to(CUDA)
    layer16.load_state_dict(layer.state_dict())
    layer16 = layer16.to(torch.bfloat16)
    x16 = x.detach().to(torch.bfloat16)
    y16 = layer16(x16, rw)  # routing weights stay fp32; the layer mixes in the input's dtype
    naive16 = naive_cond_conv2d(layer16, x16, rw)
    assert y16.dtype == torch.bfloat16
    assert _rel(y16, ref) <= BF16_TOL and _rel(naive16, ref) <= BF16_TOL and _rel(y16, naive16) <= BF16_TOL


def test_cond_conv2d_one_call_per_batch_on_cuda():
    layer = CondConv2d(64, 64, 3, 1, 1, num_experts=8).to(CUDA)
    layer.chunk_bytes = 1  # on CPU this would split the batch per sample
    calls = []
    orig = layer._grouped_conv
    layer._grouped_conv = lambda *a: calls.append(1) or orig(*a)
    layer(torch.randn(32, 64, 8, 8, device=CUDA), torch.rand(32, 8, device=CUDA))
    assert len(calls) == 1


def _cigt_pair(**options):
    """The same CIGT weights in gather and dense execution, on the GPU, routing spread over paths."""
    torch.manual_seed(0)
    gather = build_model("cigt_lenet", "tiny", execution="gather", **options)
    dense = build_model("cigt_lenet", "tiny", execution="dense", **options)
    dense.load_state_dict(gather.state_dict())
    with torch.no_grad():
        for m in (gather, dense):
            for r in m.routers:
                torch.manual_seed(1)
                r.fc2.weight.normal_(0, 3.0)
    return gather.to(CUDA), dense.to(CUDA)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cigt_gather_scatter_equals_dense_on_cuda(no_tf32, mode):
    """Gather/scatter by index on CUDA == every path on every sample (forward and gradients)."""
    options = {} if mode == "eval" else {"norm": "none", "router_dropout": 0.0, "random_path_fraction": 0.3}
    gather, dense = _cigt_pair(**options)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 1, 28, 28, generator=g).to(CUDA), torch.randint(0, 10, (48,), generator=g).to(CUDA)
    outs = []
    for m in (gather, dense):
        m.train(mode == "train")
        torch.manual_seed(5)  # the same random path choices (drawn on the GPU)
        out = m(x, y)
        out.loss.backward()
        outs.append(out)
    assert outs[0].logits.device.type == CUDA.type
    assert _rel(outs[0].logits, outs[1].logits) <= FP32_TOL
    assert (gather.routers[-1].last_stats.load > 0).sum() >= 2  # a non-trivial routing
    d_grads = {n: p.grad for n, p in dense.named_parameters() if p.grad is not None}
    g_grads = {n: p.grad for n, p in gather.named_parameters() if p.grad is not None}
    for name, ref in d_grads.items():
        got = g_grads.get(name, torch.zeros_like(ref))  # an idle path has no gradient in gather form
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), name


def test_run_routed_on_cuda_keeps_rows_in_place():
    blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)]).to(CUDA)
    h = torch.randn(20, 8, device=CUDA)
    path = torch.randint(0, 3, (20,), device=CUDA)
    out = run_routed(blocks, h, path, "gather")
    ref = torch.stack([blocks[int(k)](h[i]) for i, k in enumerate(path.tolist())])
    assert torch.allclose(out, ref, atol=1e-5)


# the families without DeepSpeed's MoE layer: in one pytest process DeepSpeed keeps the accelerator of its
# first import (the CPU tests may have made it); CoE and top-k run on the GPU in test_gpu_jobs / test_gpu_nccl
@pytest.mark.parametrize("name", ["condconv_cnn", "basisnet_cnn", "cigt_lenet"])
def test_bf16_model_on_cuda_routes_in_fp32(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny", experts=4).to(CUDA, torch.bfloat16)
    dtypes = []
    for m in model.modules():
        if isinstance(m, Fp32Linear):
            m.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype) and None)
    x = torch.randn(16, 1, 28, 28, device=CUDA, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (16,), device=CUDA)
    out = model(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss.float())
    assert dtypes and all(dt == torch.float32 for dt in dtypes)


def test_placement_moves_pinned_batches_non_blocking():
    from condmoe.trainer.config import job_from_dict
    from condmoe.trainer.device import decide_placement

    cfg = job_from_dict({"model": {"name": "condconv_cnn", "channels_last": True}, "data": {"path": "/x"},
                         "deepspeed": {"bf16": True}, "cluster": {"use_gpu": True}})
    p = decide_placement(cfg, env={"LOCAL_RANK": "0"})
    x = torch.randn(8, 1, 28, 28).pin_memory()
    y = torch.arange(8).pin_memory()
    xd, yd = p.images(x), p.move(y)
    torch.cuda.synchronize()
    assert xd.device == CUDA and xd.dtype == torch.bfloat16 and xd.is_contiguous(memory_format=torch.channels_last)
    assert yd.device == CUDA and torch.equal(yd.cpu(), y)
