"""Expert parallelism on CPU with gloo: ep_size=2 over 2 processes == ep_size=1 in one process.

Same weights and inputs; each rank runs half the batch. Expert gradients live on
the expert's home rank; non-expert gradients are per rank and must sum to the
single-process gradient of the summed per-rank losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from condmoe.routing import build_model, collect_routing_stats
from condmoe.routing.models.topk_moe_cnn import conv_expert
from condmoe.routing.topk_moe import ImageExpert, TopKMoE

from expert_parallel_workers import coe_worker, run_ranks, topk_worker



pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

WORLD = 2
SHAPE = (4, 5, 5)
D = 4 * 5 * 5


def _topk_cases() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * 24, D, generator=g)
    w = torch.randn(2 * 24, D, generator=g)
    cases = []
    for name, kwargs in {
        "k1_nodrop": dict(k=1, drop_tokens=False, min_capacity=1),
        "k2_nodrop": dict(k=2, drop_tokens=False, min_capacity=1, second_expert_sampling=False),
        "k1_residual": dict(k=1, drop_tokens=False, min_capacity=1, use_residual=True),
        "k1_capacity": dict(k=1, drop_tokens=True, capacity_factor=0.5, min_capacity=1),
    }.items():
        torch.manual_seed(0)
        layer = TopKMoE(D, ImageExpert(conv_expert(SHAPE[0]), SHAPE), 4, **kwargs)
        if name == "k1_capacity":
            with torch.no_grad():  # route by the sign pattern of two input features: skewed loads
                layer.gate.wg.weight.zero_()
                layer.gate.wg.weight[0, 0] = 5.0
                layer.gate.wg.weight[1, 1] = 5.0
        cases.append({"name": name, "kwargs": kwargs,
                      "state": layer.state_dict(), "x": x, "w": w, "layer": layer})
    return cases



def _assert_grads_match(module, rank_grads: list[dict], label: str, *, skip_unused: bool = False) -> None:
    """ep_size 2 vs 1: an expert's gradient lives on its home rank only; shared gradients sum over ranks.

    skip_unused: parameters without a gradient in the single-process run are not compared
    (otherwise every parameter must have one)."""
    for pname, p in module.named_parameters():
        if skip_unused and p.grad is None:
            continue
        if "deepspeed_experts" in pname:
            home = [g[pname] for g in rank_grads if pname in g]
            assert len(home) == 1, pname
            assert torch.allclose(home[0], p.grad, atol=1e-4), (label, pname)
        else:
            assert torch.allclose(sum(g[pname] for g in rank_grads), p.grad, atol=1e-4), (label, pname)

def test_topk_ep2_matches_ep1(tmp_path):
    cases = _topk_cases()
    torch.save({"shape": SHAPE, "cases": [{k: v for k, v in c.items() if k != "layer"} for c in cases]},
               tmp_path / "topk_spec.pt")
    run_ranks(topk_worker, (str(tmp_path),), WORLD)
    ranks = [torch.load(tmp_path / f"topk_rank{r}.pt") for r in range(WORLD)]
    b = 24
    for case in cases:
        name, layer = case["name"], case["layer"]
        layer.train()
        if name == "k1_capacity":
            continue
        x = case["x"].clone().requires_grad_(True)
        y, routing = layer(x)
        (y * case["w"]).sum().backward()
        y_ep = torch.cat([r[name]["y"] for r in ranks])
        assert torch.allclose(y_ep, y.detach(), atol=1e-5), name
        assert torch.allclose(torch.cat([r[name]["x_grad"] for r in ranks]), x.grad, atol=1e-5), name
        _assert_grads_match(layer, [r[name]["grads"] for r in ranks], name)
        # load summed over the expert-parallel group == the single-process load over the whole batch;
        # the recorded per-module stats stay per rank and sum to it
        for r in ranks:
            assert r[name]["stats"]["load"] == routing.stats.load.tolist(), name
            assert r[name]["stats"]["samples"] == 2 * b and r[name]["stats"]["dropped"] == 0
            assert r[name]["local_stats"]["samples"] == b
        summed = [sum(v) for v in zip(*(r[name]["local_stats"]["load"] for r in ranks))]
        assert summed == routing.stats.load.tolist(), name

    # small capacity: dropped == sum over ranks and experts of max(0, load - capacity)
    cap_case = next(c for c in cases if c["name"] == "k1_capacity")
    layer = cap_case["layer"]
    expected = 0
    for r in range(WORLD):
        chunk = cap_case["x"][r * b : (r + 1) * b]
        choice = (chunk @ layer.gate.wg.weight.t()).argmax(-1)
        counts = torch.bincount(choice, minlength=4)
        capacity = max(math.ceil(b / 4 * 0.5), 1)
        assert ranks[r]["k1_capacity"]["capacity"] == capacity
        expected += int((counts - capacity).clamp_min(0).sum())
        # a dropped token (k=1) gets a zero output row
        zero_rows = int((ranks[r]["k1_capacity"]["y"].abs().sum(-1) == 0).sum())
        assert zero_rows == int((counts - capacity).clamp_min(0).sum())
    assert expected > 0
    for r in ranks:
        assert r["k1_capacity"]["stats"]["dropped"] == expected
    assert sum(r["k1_capacity"]["local_stats"]["dropped"] for r in ranks) == expected


def test_coe_ep2_matches_ep1(tmp_path):
    options = dict(experts=4, norm="group", dropout=0.0, lgm="argmin", seed=7)
    torch.manual_seed(0)
    model = build_model("coe_cnn", "tiny", **options)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * 16, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2 * 16,), generator=g)
    torch.save({"options": options, "state": model.state_dict(), "x": x, "y": y}, tmp_path / "coe_spec.pt")
    run_ranks(coe_worker, (str(tmp_path),), WORLD)
    ranks = [torch.load(tmp_path / f"coe_rank{r}.pt") for r in range(WORLD)]
    for mode in ("train", "eval"):
        model.train(mode == "train")
        model.zero_grad(set_to_none=True)
        out = model(x, y)
        # per-rank losses are means over half the batch: their sum is twice the whole-batch mean
        (2 * out.loss).backward()
        stats = collect_routing_stats(model)["root"]
        assert torch.allclose(torch.cat([r[mode]["logits"] for r in ranks]), out.logits.detach(), atol=1e-5), mode
        _assert_grads_match(model, [r[mode]["grads"] for r in ranks], mode, skip_unused=True)
        for r in ranks:
            assert r[mode]["group_stats"]["load"] == stats.load.tolist()
            assert r[mode]["group_stats"]["samples"] == x.shape[0]
            assert r[mode]["stats"]["samples"] == x.shape[0] // WORLD  # recorded: this rank's own
        assert [sum(v) for v in zip(*(r[mode]["stats"]["load"] for r in ranks))] == stats.load.tolist()


def test_deepspeed_engine_zero2_trains_hard_routed_models(tmp_path):
    """DeepSpeed recognises our expert params: shared params stay in sync across ranks, experts differ,
    and DeepSpeed's per-expert checkpoint files restore them. CIGT trains data-parallel."""
    from expert_parallel_workers import engine_worker

    run_ranks(engine_worker, (str(tmp_path),), WORLD, timeout=240)
    ranks = [torch.load(tmp_path / f"engine_rank{r}.pt") for r in range(WORLD)]
    # one file per global CoE expert, written by the rank that holds it
    expert_files = sorted(p.name for p in (tmp_path / "ckpt_coe_cnn" / "t").glob("*expert_*"))
    assert len(expert_files) == 4 and all(f"expert_{g}_" in " ".join(expert_files) for g in range(4)), expert_files
    for name in ("topk_moe_cnn", "coe_cnn", "cigt_lenet"):
        for r in ranks:
            assert r[name]["restored"] in ((True,) if name == "coe_cnn" else (None,)), name  # checkpoint round trip
            losses = r[name]["losses"]
            assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (name, losses)
        p0, p1 = ranks[0][name]["params"], ranks[1][name]["params"]
        assert p0.keys() == p1.keys()
        shared = [n for n in p0 if "deepspeed_experts" not in n]
        experts = [n for n in p0 if "deepspeed_experts" in n]
        assert shared and (experts or name == "cigt_lenet")
        for n in shared:  # data-parallel all-reduce kept them identical (CIGT: even paths idle on one rank)
            assert torch.allclose(p0[n], p1[n], atol=1e-6), (name, n)
        # each rank holds different experts (global 0,1 vs 2,3) trained on different samples
        assert not experts or any(not torch.allclose(p0[n], p1[n]) for n in experts), name
