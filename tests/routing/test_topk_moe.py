"""Top-k MoE layer on DeepSpeed MoE (single process): stats, capacity drops, options, cost, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from condmoe.routing import build_model, collect_routing_stats, count_macs
from condmoe.routing.models.topk_moe_cnn import conv_expert
from condmoe.routing.topk_moe import ImageExpert, TopKMoE



SHAPE = (4, 5, 5)
D = 100


def _layer(num_experts: int = 4, **kwargs) -> TopKMoE:
    torch.manual_seed(0)
    return TopKMoE(D, ImageExpert(conv_expert(SHAPE[0]), SHAPE), num_experts, **kwargs)


def _skew_gate(layer: TopKMoE) -> None:
    """Gate logits = (8 x_0, 5 x_1, 5 x_2, 5 x_3): predictable, no ties, expert 0 favoured."""
    with torch.no_grad():
        layer.gate.wg.weight.zero_()
        for e in range(layer.num_experts):
            layer.gate.wg.weight[e, e] = 8.0 if e == 0 else 5.0


def test_one_expert_moe_equals_the_dense_expert():
    body = conv_expert(SHAPE[0])
    layer = TopKMoE(D, ImageExpert(body, SHAPE), 1, k=1, drop_tokens=False, min_capacity=1)
    expert = layer.moe.deepspeed_moe.experts.deepspeed_experts[0]
    x = torch.randn(12, D)
    y, routing = layer(x)
    assert torch.allclose(y, expert(x), atol=1e-6)
    assert routing.stats.load.tolist() == [12.0] and routing.stats.dropped == 0


@pytest.mark.parametrize("k", [1, 2])
def test_dropped_count_equals_capacity_overflow(k):
    layer = _layer(k=k, capacity_factor=0.5, min_capacity=1, second_expert_sampling=False)
    _skew_gate(layer)
    x = torch.randn(40, D)
    y, routing = layer(x)
    logits = x @ layer.gate.wg.weight.t()
    top = logits.topk(k, dim=-1).indices  # DeepSpeed's choice without noise
    counts = torch.bincount(top.reshape(-1), minlength=4)
    capacity = max(math.ceil(40 / 4 * 0.5 * k), 1)
    assert layer.capacity(40) == capacity
    expected = int((counts - capacity).clamp_min(0).sum())
    assert expected > 0
    assert routing.stats.dropped == expected
    assert routing.stats.load.tolist() == counts.double().tolist()  # assignments before capacity
    assert int((routing.indices < 0).sum()) == expected
    kept = torch.bincount(routing.indices[routing.indices >= 0], minlength=4)
    assert (kept <= capacity).all()
    if k == 1:  # a dropped token's output row is zero, its combine weights too
        dropped_rows = (routing.indices[:, 0] < 0)
        assert (y[dropped_rows] == 0).all() and (routing.weights[dropped_rows] == 0).all()


def test_no_drop_keeps_every_token_and_weights_sum_to_one():
    layer = _layer(k=2, drop_tokens=False, min_capacity=1)
    _skew_gate(layer)
    x = torch.randn(40, D)
    _, routing = layer(x)
    assert routing.stats.dropped == 0 and (routing.indices >= 0).all()
    assert torch.allclose(routing.weights.sum(-1), torch.ones(40), atol=1e-5)
    assert routing.stats.load.sum().item() == 80  # k assignments per token


def test_load_balance_loss_is_returned_and_matches_switch_formula():
    layer = _layer(k=1, drop_tokens=False, min_capacity=1, aux_loss_weight=0.5)
    x = torch.randn(32, D)
    _, routing = layer(x)
    gates = torch.softmax(x @ layer.gate.wg.weight.t(), -1)
    me = gates.mean(0)
    ce = torch.bincount(gates.argmax(-1), minlength=4).float() / 32
    expected = 0.5 * 4 * (me * ce).sum()
    assert routing.aux_losses["load_balance"].item() == pytest.approx(expected.item(), rel=1e-5)
    routing.aux_losses["load_balance"].backward()
    assert layer.gate.wg.weight.grad is not None and layer.gate.wg.weight.grad.abs().sum() > 0


def test_options_noisy_gating_residual_and_eval_capacity():
    x = torch.randn(32, D)
    for policy, k in (("Jitter", 2), ("RSample", 1)):
        layer = _layer(k=k, noisy_gate_policy=policy, min_capacity=1)
        y, routing = layer(x)
        assert y.shape == x.shape and routing.stats.samples == 32
    residual = _layer(k=1, use_residual=True, drop_tokens=False, min_capacity=1)
    plain = _layer(k=1, drop_tokens=False, min_capacity=1)
    assert hasattr(residual.moe, "coefficient") and not hasattr(plain.moe, "coefficient")
    assert not torch.allclose(residual(x)[0], plain(x)[0])
    layer = _layer(k=1, capacity_factor=0.5, eval_capacity_factor=2.0, min_capacity=1)
    assert layer.capacity(32) == 4
    layer.eval()
    assert layer.capacity(32) == 16


def test_bad_options_raise_naming_the_value():
    with pytest.raises(ValueError, match="k must be"):
        _layer(k=5)
    with pytest.raises(ValueError, match="'RSample' only works with k=1"):
        _layer(k=2, noisy_gate_policy="RSample")
    with pytest.raises(ValueError, match="noisy_gate_policy must be"):
        _layer(noisy_gate_policy="gaussian")
    with pytest.raises(ValueError, match="ep_size=3"):
        _layer(ep_size=3)
    with pytest.raises(ValueError, match="ep_size=2 needs torch.distributed"):
        _layer(ep_size=2)
    with pytest.raises(ValueError, match="fewer than min_capacity=4"):
        _layer(min_capacity=4)(torch.randn(3, D))
    with pytest.raises(ValueError, match=r"expects tokens \(N, 100\)"):
        _layer()(torch.randn(3, 7))
    with pytest.raises(ValueError, match="keep the shape"):
        ImageExpert(nn.Conv2d(4, 8, 1), SHAPE)(torch.randn(2, D))


def test_expert_params_are_deepspeed_moe_params():
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    model = build_model("topk_moe_cnn", "tiny", experts=4)
    names = {n for n, p in model.named_parameters() if is_moe_param(p)}
    assert names and all("deepspeed_experts" in n for n in names)
    assert not is_moe_param(model.moe.gate.wg.weight)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    moe_groups = [g for g in groups if g.get("moe")]
    assert len(moe_groups) == 1 and moe_groups[0]["name"] == "ep_size_1"
    assert sum(p.numel() for p in moe_groups[0]["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if n in names)


def test_macs_count_gate_and_capacity_buffers():
    model = build_model("topk_moe_cnn", "tiny", experts=4, k=1, eval_capacity_factor=1.0, min_capacity=1)
    model.eval()
    x = torch.randn(16, 1, 28, 28)
    report = count_macs(model, x)
    c1 = 16  # tiny: stem channels (8, 16), tokens (16, 7, 7)
    token = c1 * 7 * 7
    capacity = model.moe.capacity(16)  # DeepSpeed runs every expert on its full capacity buffer
    expert_macs = 2 * (7 * 7 * c1 * c1 * 9)
    moe_part = sum(v for k, v in report.by_module.items() if k.startswith("moe"))
    assert moe_part * 16 == pytest.approx(16 * token * 4 + 4 * capacity * expert_macs)
    stats = collect_routing_stats(model)["moe"]
    assert stats.samples == 16 and stats.load.sum() == 16


def test_registered_sizes_build_and_return_model_output():
    for size in ("tiny", "small"):
        model = build_model("topk_moe_cnn", size, experts=4, k=2)
        out = model(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
        assert out.logits.shape == (8, 10) and out.exited is None
        assert set(out.losses) == {"ce", "load_balance"}
        assert out.loss.item() == pytest.approx((out.losses["ce"] + out.losses["load_balance"]).item(), rel=1e-5)
    # other input sizes work (adaptive pooling to the 7x7 token grid)
    out = build_model("topk_moe_cnn", "tiny", experts=2, in_channels=3)(torch.randn(4, 3, 20, 20))
    assert out.logits.shape == (4, 10)


@pytest.mark.parametrize("name", ["topk_moe_cnn", "coe_cnn", "cigt_lenet"])
def test_hard_routing_models_pickle(name):
    """The DeepSpeed-MoE subclasses are created lazily but still pickle by reference (Ray ships objects)."""
    import pickle

    model = build_model(name, "tiny").eval()
    clone = pickle.loads(pickle.dumps(model)).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, clone(x).logits)
