"""The condconv_cnn family: shared routing per block, static baseline, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condmoe.routing import build_model, list_models
from condmoe.routing.cond_conv2d import CondConv2d
from condmoe.routing.cond_conv_block import CondConvRouter


def test_registry_lists_sizes_and_rejects_unknowns():
    models = list_models()
    assert models["condconv_cnn"] == ("tiny", "small", "base")
    assert "basisnet_cnn" in models
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="no size 'huge'"):
        build_model("condconv_cnn", "huge")


def test_one_routing_vector_per_block_shared_by_its_condconvs():
    torch.manual_seed(0)
    model = build_model("condconv_cnn", "tiny", experts=4).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    routed: dict[str, torch.Tensor] = {}
    hooks = []
    for bi, block in enumerate(model.blocks):
        for conv in (block.expand, block.depthwise, block.project):
            hooks.append(conv.register_forward_hook(lambda m, i, o, b=bi: seen.setdefault(b, []).append(i[1])))
        hooks.append(block.router.register_forward_hook(lambda m, i, o, b=bi: routed.__setitem__(b, o.weights)))
    model(torch.randn(3, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert len(seen) == len(model.blocks)
    for b, rws in seen.items():
        assert len(rws) == 3 and all(rw is routed[b] for rw in rws)
        assert ((routed[b] > 0) & (routed[b] < 1)).all()  # sigmoid, not softmax
        assert not torch.allclose(routed[b].sum(-1), torch.ones(3))


def test_one_expert_is_the_static_baseline_of_the_same_shape():
    static = build_model("condconv_cnn", "small", experts=1)
    routed = build_model("condconv_cnn", "small", experts=8)
    assert not any(isinstance(m, (CondConv2d, CondConvRouter)) for m in static.modules())
    convs = [m for m in static.modules() if isinstance(m, nn.Conv2d)]
    cconvs = [m for m in routed.modules() if isinstance(m, (nn.Conv2d, CondConv2d))]
    assert [(c.in_channels, c.out_channels, tuple(c.kernel_size) if not isinstance(c.kernel_size, tuple) else c.kernel_size, c.groups) for c in convs] == \
        [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in cconvs]
    x = torch.randn(2, 1, 28, 28)
    assert static(x).logits.shape == routed(x).logits.shape == (2, 10)


def test_module_conversions_work_on_every_family():
    # .to()/.double() walk nn.Module._apply: no layer may shadow it (DeepSpeed calls .to(device))
    for name in ("condconv_cnn", "basisnet_cnn"):
        model = build_model(name, "tiny", experts=4).to(torch.float64)
        assert model(torch.randn(2, 1, 28, 28, dtype=torch.float64)).logits.dtype == torch.float64
