"""ImageNet-scale families: published multiply-adds and parameters, early-exit averages, routing stats.

Figures are the papers' (shared/METHODS.md, issue 11); count_macs counts
convolutions and FC layers (routing FCs and kernel mixing included) and runs
1-2% below the papers' own counts, so every row must agree within 3%.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from condmoe.routing import ModelOutput, build_model, collect_routing_stats, count_macs, model_families
from condmoe.routing.cond_conv2d import CondConv2d
from condmoe.routing.cond_conv_block import CondConvRouter
from condmoe.routing.models.cigt_resnet import thick_resnet110

# (family, size, experts, input side, paper multiply-adds, paper parameters or None, source)
TABLE = [
    ("condconv_efficientnet", "b0", 1, 224, 390e6, 5.3e6, "EfficientNet-B0 (CondConv paper, arXiv 1904.04971)"),
    ("condconv_efficientnet", "b0", 8, 224, 413e6, 24.0e6, "CondConv-EfficientNet-B0, 8 experts"),
    ("condconv_efficientnet", "b1", 1, 240, 700e6, 7.8e6, "EfficientNet-B1 (arXiv 1905.11946)"),
    ("condconv_efficientnet", "b1", 8, 240, None, 39.7e6, "timm tf_efficientnet_cc_b1_8e (TF checkpoint port)"),
    ("condconv_mobilenet_v1", "0.5x", 1, 224, 149e6, None, "MobileNetV1 0.5x (arXiv 1704.04861)"),
    ("condconv_mobilenet_v1", "0.5x", 32, 224, 149e6 * 1.27, None, "CondConv-MobileNetV1 0.5x: +27%"),
    ("condconv_mobilenet_v1", "1.0x", 1, 224, 569e6, 4.2e6, "MobileNetV1 1.0x (arXiv 1704.04861)"),
    ("condconv_mobilenet_v1", "1.0x", 32, 224, 569e6 * 1.22, None, "CondConv-MobileNetV1 1.0x: +22%"),
    ("condconv_mobilenet_v2", "1.0x", 1, 224, 300e6, 3.5e6, "MobileNetV2 1.0x (arXiv 1801.04381)"),
    ("condconv_mobilenet_v2", "1.0x", 8, 224, 329e6, None, "CondConv-MobileNetV2 1.0x (BasisNet Table 1)"),
    ("basisnet_mobilenet_v3", "large", 8, 224, 290e6, None, "BasisNet-MobileNetV3 (arXiv 2105.03014)"),
    ("basisnet_mobilenet_v3", "large", 1, 224, 219e6, 5.4e6, "MobileNetV3-Large 1.0x (arXiv 1905.02244)"),
    ("coe_mobilenet", "194m", 4, 224, 194e6, None, "CoE: delegator + one expert (arXiv 2107.03815)"),
    ("coe_mobilenet", "194m", 1, 224, 155e6, 4.0e6, "one expert: MobileNetV3-Large 0.75x (arXiv 1905.02244)"),
]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _within(measured: float, paper: float, tol: float = 0.03) -> bool:
    return abs(measured / paper - 1.0) <= tol


@pytest.mark.parametrize("name, size, experts, side, macs, params, source", TABLE,
                         ids=[f"{r[0]}-{r[1]}-e{r[2]}" for r in TABLE])
def test_multiply_adds_and_parameters_match_the_papers(name, size, experts, side, macs, params, source):
    torch.manual_seed(0)
    model = build_model(name, size, experts=experts)
    if params is not None:
        assert _within(_params(model), params), f"{source}: {_params(model) / 1e6:.2f}M params vs {params / 1e6}M"
    if macs is not None:
        measured = count_macs(model, torch.randn(1, 3, side, side)).per_sample
        assert _within(measured, macs), f"{source}: {measured / 1e6:.1f}M MAdds vs {macs / 1e6:.0f}M"


@pytest.mark.parametrize("name, size, first_routed", [
    ("condconv_efficientnet", "b0", 8), ("condconv_mobilenet_v2", "1.0x", 10), ("condconv_mobilenet_v1", "0.5x", 6),
])
def test_one_expert_is_the_static_network_of_the_same_shape(name, size, first_routed):
    static, routed = build_model(name, size, experts=1), build_model(name, size, experts=4)
    assert not any(isinstance(m, (CondConv2d, CondConvRouter)) for m in static.modules())

    def shapes(model):  # a CondConv classifier is a 1x1 CondConv2d where the static one is nn.Linear
        return [(c.in_features, c.out_features, (1, 1), 1, 1) if isinstance(c, nn.Linear) else
                (c.in_channels, c.out_channels, tuple(c.kernel_size), c.groups, c.stride[0])
                for c in model.modules() if isinstance(c, (nn.Conv2d, CondConv2d, nn.Linear))
                and not (isinstance(c, nn.Linear) and c.out_features == 4)]  # routing FCs (4 experts)

    assert shapes(static) == shapes(routed)
    # CondConv only from the paper's cut on (the earlier blocks stay static)
    blocks = list(routed.blocks)
    assert not any(isinstance(m, CondConv2d) for b in blocks[:first_routed] for m in b.modules())
    assert all(any(isinstance(m, CondConv2d) for m in b.modules()) for b in blocks[first_routed:])


@torch.no_grad()
def _calibrate_batch_norm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics = this batch's (one training-mode forward), then eval mode.

    At initialisation the running statistics are (0, 1): in eval mode batch norm is then
    the identity and the activations of these deep networks shrink to ~1e-9, every
    sample with the same (uniform) prediction; real networks are evaluated trained.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()(x)
    return model.eval()


def _exit_average(model, x, set_threshold, thresholds):
    """count_macs per sample at each threshold (None: no early exit)."""
    out = {}
    for key, t in thresholds.items():
        set_threshold(t)
        out[key] = count_macs(model, x).per_sample
    return out


def test_basisnet_early_exit_average_when_half_the_batch_exits():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    model = _calibrate_batch_norm(build_model("basisnet_mobilenet_v3", "large", experts=8), x)
    conf, _ = model.exit_scores(x)
    mid = conf.sort().values[1:3].mean().item()  # the stated threshold: half of this batch exits

    def set_threshold(t):
        model.config = dataclasses.replace(model.config, exit_threshold=t)

    m = _exit_average(model, x, set_threshold, {"light": 0.0, "full": None, "mid": mid})
    stay = int((conf < mid).sum())
    assert stay == 2
    assert m["light"] < m["mid"] < m["full"]
    assert m["mid"] == pytest.approx(m["light"] + (m["full"] - m["light"]) * stay / 4, rel=1e-9)
    assert _within(m["full"], 290e6) and 40e6 < m["light"] < 45e6
    out = model(x)
    assert int(out.exited.sum()) == 2
    assert collect_routing_stats(model)["coefficients"].early_exits == 2


def test_coe_early_exit_average_when_half_the_batch_exits():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    model = _calibrate_batch_norm(build_model("coe_mobilenet", "194m", experts=4), x)
    conf, _ = model.exit_scores(x)  # 1 - uncertainty
    mid = 1.0 - conf.sort().values[1:3].mean().item()  # the stated threshold: half of this batch exits

    def set_threshold(t):
        model.config = dataclasses.replace(model.config, exit_threshold=t)

    m = _exit_average(model, x, set_threshold, {"delegator": 1.0, "full": None, "mid": mid})
    stay = int((1.0 - conf > mid).sum())
    assert stay == 2
    assert m["delegator"] < m["mid"] < m["full"]
    assert m["mid"] == pytest.approx(m["delegator"] + (m["full"] - m["delegator"]) * stay / 4, rel=1e-9)
    assert _within(m["full"], 194e6)
    assert collect_routing_stats(model)["root"].early_exits == 2


# family -> (size, experts, input side, routed layers reporting RoutingStats, routing kind)
TRAIN_CASES = {
    "condconv_efficientnet": ("b0", 4, 64, 8, "soft"),
    "condconv_mobilenet_v1": ("0.5x", 4, 64, 8, "soft"),
    "condconv_mobilenet_v2": ("1.0x", 4, 64, 8, "soft"),
    "basisnet_mobilenet_v3": ("large", 4, 64, 1, "soft"),
    "coe_mobilenet": ("194m", 2, 64, 1, "hard"),
    "cigt_resnet": ("tiny", 4, 32, 2, "hard"),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_forward_backward_and_routing_stats(name):
    size, experts, side, routed, kind = TRAIN_CASES[name]
    torch.manual_seed(0)
    model = build_model(name, size, experts=experts, num_classes=10).train()
    x, y = torch.randn(2, 3, side, side), torch.randint(0, 10, (2,))
    out = model(x, y)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 10)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    stats = collect_routing_stats(model)
    assert len(stats) == routed and all(s.kind == kind and s.samples == 2 for s in stats.values())
    # the static baseline of the same shape runs too and routes nothing
    static = build_model(name, size, experts=1, num_classes=10).eval()
    assert static(x).logits.shape == (2, 10)
    assert collect_routing_stats(static) == {} or name == "cigt_resnet"


def test_cigt_resnet_costs_one_path_plus_routers():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    trellis = count_macs(build_model("cigt_resnet", "resnet110", experts=4), x).per_sample
    thin = count_macs(build_model("cigt_resnet", "resnet110", experts=1), x).per_sample
    thick = count_macs(thick_resnet110(), x).per_sample
    # every sample takes one path per layer: the trellis costs the thin baseline plus the
    # routers' wider last FC (128 -> 2 and 128 -> 4 instead of 128 -> 1)
    assert trellis - thin == 128 * (2 - 1) + 128 * (4 - 1)
    assert 0.3 < trellis / thick < 0.4  # about a third of the thick ResNet-110's 253M


def test_options_reach_the_networks():
    v2 = build_model("condconv_mobilenet_v2", "1.0x", experts=4, cond_stages=1, cond_classifier=False)
    assert sum(isinstance(m, CondConvRouter) for m in v2.modules()) == 1
    eff = build_model("condconv_efficientnet", "b0", experts=4, cond_stages=0)
    assert not any(isinstance(m, CondConv2d) for m in eff.modules())
    assert build_model("basisnet_mobilenet_v3", "large", experts=4, temperature=2.0).config.temperature == 2.0
    assert build_model("coe_mobilenet", "194m", experts=2, lgm="argmin").config.lgm == "argmin"
    assert build_model("cigt_resnet", "tiny", experts=2, execution="dense").config.execution == "dense"
    assert model_families()["coe_mobilenet"].expert_parallel
    assert not model_families()["cigt_resnet"].expert_parallel
    with pytest.raises(ValueError, match="cond_stages"):
        build_model("condconv_efficientnet", "b0", cond_stages=9)
