"""RoutingStats arithmetic and collection by walking a model."""

from __future__ import annotations

import math

import pytest
import torch

from condmoe.routing import RoutingStats, accumulate_stats, build_model, collect_routing_stats


def test_entropy_and_imbalance():
    even = RoutingStats.from_load(torch.tensor([5.0, 5.0, 5.0, 5.0]), 20)
    assert even.entropy == pytest.approx(1.0)
    assert even.imbalance == pytest.approx(1.0)
    collapsed = RoutingStats.from_load(torch.tensor([0.0, 20.0, 0.0, 0.0]), 20)
    assert collapsed.entropy == pytest.approx(0.0)
    assert collapsed.imbalance == pytest.approx(4.0)
    half = RoutingStats.from_load(torch.tensor([10.0, 10.0, 0.0, 0.0]), 20)
    assert half.entropy == pytest.approx(math.log(2) / math.log(4))


def test_add_and_tensor_round_trip():
    a = RoutingStats.from_load(torch.tensor([1.0, 2.0]), 3, dropped=1, early_exits=2)
    b = RoutingStats.from_load(torch.tensor([4.0, 0.0]), 4, dropped=0, early_exits=1)
    s = a + b
    assert s.load.tolist() == [5.0, 2.0] and (s.samples, s.dropped, s.early_exits) == (7, 1, 3)
    back = RoutingStats.from_tensor(s.to_tensor())
    assert back.load.tolist() == s.load.tolist() and back.samples == 7 and back.early_exits == 3
    again = RoutingStats.from_dict(s.as_dict())
    assert again.load.tolist() == s.load.tolist() and again.as_dict() == s.as_dict()
    with pytest.raises(ValueError, match="2 and 3 experts"):
        a + RoutingStats.from_load(torch.ones(3), 1)
    with pytest.raises(ValueError, match="kind"):
        RoutingStats.from_load(torch.ones(2), 1, kind="medium")


def test_collect_walks_every_router_and_clears():
    torch.manual_seed(0)
    model = build_model("condconv_cnn", "small", experts=4)
    x = torch.randn(6, 1, 28, 28)
    model(x)
    stats = collect_routing_stats(model)
    n_blocks = len(model.blocks)
    assert len(stats) == n_blocks
    for name, st in stats.items():
        assert name.endswith(".router") and st.kind == "soft"
        assert st.samples == 6 and st.num_experts == 4
        # soft load = summed sigmoid weights: each in (0, 1), not normalised over experts
        assert 0 < st.load.sum().item() < 6 * 4
    assert collect_routing_stats(model) == {}  # cleared
    model(x)
    totals = accumulate_stats(stats, collect_routing_stats(model))
    assert all(t.samples == 12 for t in totals.values())
