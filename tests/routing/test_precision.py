"""bf16 models keep their routing math in float32 (routing/precision.py), checked on the CPU.

Each Fashion-MNIST family is cast to bfloat16 the way DeepSpeed's bf16 mode casts it (every
parameter and buffer), runs a training and an evaluation forward on bf16 images, and must give
float32 router logits and routing weights, a float32 information-gain loss, and finite outputs.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from condmoe.routing import CIGTRouter, CondConvRouter, build_model
from condmoe.routing.basisnet import BasisCoefficients
from condmoe.routing.macs import count_macs
from condmoe.routing.precision import Fp32Linear, fp32_linear

FAMILIES = [("condconv_cnn", {}), ("basisnet_cnn", {}), ("coe_cnn", {}), ("cigt_lenet", {}),
            ("topk_moe_cnn", {})]


def test_fp32_linear_is_linear_in_fp32_and_upcasts_bf16():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    assert torch.equal(fp32_linear(lin, x), lin(x))  # exactly nn.Linear for float32
    lin16 = nn.Linear(6, 3).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16).requires_grad_(True)
    y = fp32_linear(lin16, x16)
    assert y.dtype == torch.float32
    ref = x16.detach().float() @ lin16.weight.detach().float().t() + lin16.bias.detach().float()
    assert torch.allclose(y, ref, atol=1e-6)  # no bf16 rounding of the result
    y.sum().backward()
    assert lin16.weight.grad.dtype == torch.bfloat16 and x16.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32_linear(lin, x).dtype == torch.float32  # autocast off inside


def test_fp32_linear_module_keeps_state_dict_and_macs():
    a, b = nn.Linear(5, 2), Fp32Linear(5, 2)
    assert a.state_dict().keys() == b.state_dict().keys() and isinstance(b, nn.Linear)
    rep = count_macs(nn.Sequential(b), torch.randn(3, 5))
    assert rep.per_sample == 10  # counted as a linear layer


def _hook_routers(model: nn.Module) -> list[tuple[str, torch.dtype]]:
    """(what, dtype) of every router logit / routing-weight tensor produced in the next forwards."""
    seen: list[tuple[str, torch.dtype]] = []

    def on_linear(mod, inputs, out):
        seen.append(("fp32 linear", out.dtype))

    def on_router(mod, inputs, out):
        if isinstance(out, tuple):  # CIGT: (logits, probabilities)
            seen.extend(("cigt " + n, t.dtype) for n, t in zip(("logits", "probs"), out))
        else:
            seen.append((type(mod).__name__ + " weights", out.weights.dtype))

    for m in model.modules():
        if isinstance(m, Fp32Linear):
            m.register_forward_hook(on_linear)
        if isinstance(m, (CondConvRouter, BasisCoefficients, CIGTRouter)):
            m.register_forward_hook(on_router)
    return seen


@pytest.mark.parametrize("name, opts", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_bf16_model_routes_in_fp32(name, opts):
    if name in ("topk_moe_cnn", "coe_cnn"):  # DeepSpeed's MoE layer: its CPU accelerator (read at its import)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.manual_seed(0)
    model = build_model(name, "tiny", experts=4, **opts).to(torch.bfloat16)
    seen = _hook_routers(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 28, 28, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 10, (16,), generator=g)
    model.train()
    out = model(x, y)
    assert torch.isfinite(out.loss.float()) and torch.isfinite(out.logits.float()).all()
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in grads)
    for key, value in out.losses.items():
        if key.startswith("info_gain"):
            assert value.dtype == torch.float32, key
    model.eval()
    with torch.no_grad():
        ev = model(x)
    assert torch.isfinite(ev.logits.float()).all()
    if name == "topk_moe_cnn":  # DeepSpeed's gate: fp32 logits from input.float() and wg.weight.float()
        gate_out = {}
        moe = next(m for m in model.modules() if type(m).__name__ == "TopKMoE")

        def on_gate(mod, inputs, o):  # (l_aux, capacity, experts, indices, locations, gates, counts)
            gate_out["gates"] = o[5]

        moe.gate.register_forward_hook(on_gate)
        model(x)
        assert gate_out["gates"].dtype == torch.float32
        return
    assert seen, f"{name}: no router ran"
    bad = [(what, dt) for what, dt in seen if dt != torch.float32]
    assert not bad, f"{name}: routing math not in float32: {bad}"
