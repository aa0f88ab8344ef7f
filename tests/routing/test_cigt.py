"""CIGT: gather/scatter == dense run-all-paths (forward and gradients), skipped paths, MAdds, schedule."""

from __future__ import annotations

import pytest
import torch

from condmoe.routing import CIGTConfig, build_model, collect_routing_stats, count_macs
from condmoe.routing.cigt import run_routed



def _pair(**options):
    """The same weights in gather and dense execution."""
    torch.manual_seed(0)
    gather = build_model("cigt_lenet", "tiny", execution="gather", **options)
    dense = build_model("cigt_lenet", "tiny", execution="dense", **options)
    dense.load_state_dict(gather.state_dict())
    with torch.no_grad():  # spread the routing so several paths get samples
        for m in (gather, dense):
            for r in m.routers:
                torch.manual_seed(1)
                r.fc2.weight.normal_(0, 3.0)
    return gather, dense


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gather_scatter_equals_dense_forward_and_gradients(mode):
    # train mode: batch norm would see different samples in the two forms, so use none
    options = {} if mode == "eval" else {"norm": "none", "router_dropout": 0.0, "random_path_fraction": 0.3}
    gather, dense = _pair(**options)
    x, y = torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,))
    outs = []
    for m in (gather, dense):
        m.train(mode == "train")
        torch.manual_seed(5)  # the same random path choices
        out = m(x, y)
        out.loss.backward()
        outs.append(out)
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-5)
    loads = [r.last_stats.load for r in gather.routers]
    assert (loads[-1] > 0).sum() >= 2  # a non-trivial routing
    g_grads, d_grads = _grads(gather), _grads(dense)
    for name, g in d_grads.items():
        got = g_grads.get(name, torch.zeros_like(g))  # an idle path has no gradient in gather form
        assert torch.allclose(got, g, atol=1e-5), name


def test_empty_paths_are_skipped_and_blocks_see_only_their_samples():
    gather, _ = _pair()
    gather.eval()
    calls = {}
    for l, blocks in enumerate(gather.layers):
        for k, blk in enumerate(blocks):
            blk.register_forward_hook(lambda m, i, o, key=(l, k): calls.__setitem__(key, i[0].shape[0]))
    x = torch.randn(32, 1, 28, 28)
    gather(x)
    stats = [r.last_stats.load for r in gather.routers]
    for l in (1, 2):
        for k, n in enumerate(stats[l - 1].tolist()):
            assert calls.get((l, k), 0) == int(n)  # absent = never called
    # force every sample onto path 0 of the last layer: the other three leaves never run
    with torch.no_grad():
        gather.routers[1].fc2.weight.zero_()
        gather.routers[1].fc2.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    calls.clear()
    gather(x)
    assert calls[(2, 0)] == 32 and not any(key in calls for key in ((2, 1), (2, 2), (2, 3)))


def test_macs_count_only_routed_work():
    gather, dense = _pair()
    x = torch.randn(32, 1, 28, 28)
    g, d = count_macs(gather, x), count_macs(dense, x)
    block = [[count_macs(b, torch.randn(2, *shape)).per_sample for b in layer]
             for layer, shape in zip(gather.layers, [(1, 28, 28), (16, 14, 14), (16, 7, 7)])]
    routers = sum(v for k, v in g.by_module.items() if k.startswith("routers"))
    loads = [torch.tensor([32.0])] + [r.last_stats.load for r in gather.routers]
    expected = routers + sum(sum(m * n / 32 for m, n in zip(block[l], loads[l].tolist())) for l in range(3))
    assert g.per_sample == pytest.approx(expected, rel=1e-6)
    dense_expected = routers + sum(sum(layer) for layer in block)
    assert d.per_sample == pytest.approx(dense_expected, rel=1e-6)
    assert g.per_sample < 0.6 * d.per_sample


def test_warmup_random_routing_temperature_and_random_fraction():
    torch.manual_seed(0)
    model = build_model("cigt_lenet", "tiny", warmup_steps=2, initial_temperature=25.0, temperature_decay=0.5,
                        min_temperature=0.1, random_path_fraction=0.0)
    with torch.no_grad():  # the routers strongly prefer path 0
        for r in model.routers:
            r.fc2.weight.zero_()
            r.fc2.bias.zero_()
            r.fc2.bias[0] = 1000.0
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model.train()
    assert model.temperature() == 25.0
    model(x, y)  # warm-up: random routing despite the router
    assert (model.routers[1].last_stats.load > 0).sum() >= 3
    model(x, y)
    assert int(model.step) == 2 and not model.in_warmup and model.temperature() == 25.0
    model(x, y)  # argmax routing: everyone on path 0
    assert model.routers[1].last_stats.load.tolist() == [64.0, 0.0, 0.0, 0.0]
    assert model.temperature() == pytest.approx(12.5)
    for _ in range(10):
        model(x, y)
    assert model.temperature() == pytest.approx(0.1)  # clipped at the minimum
    model.config = CIGTConfig(**{**model.config.__dict__, "random_path_fraction": 0.5})
    model(x, y)
    load = model.routers[1].last_stats.load
    assert 10 < load[0].item() < 64 and load[1:].sum() > 0
    model.eval()
    model(x)
    assert model.routers[1].last_stats.load.tolist() == [64.0, 0.0, 0.0, 0.0]


def test_losses_and_router_gradient_comes_from_information_gain_only():
    torch.manual_seed(0)
    model = build_model("cigt_lenet", "tiny", info_gain_weight=0.0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    out = model(x, y)
    assert set(out.losses) == {"ce", "info_gain_0", "info_gain_1"}
    out.loss.backward()
    for r in model.routers:  # with lambda = 0 hard routing passes the router no gradient
        assert r.fc2.weight.grad is None or r.fc2.weight.grad.abs().sum() == 0
    model.zero_grad()
    model2 = build_model("cigt_lenet", "tiny", info_gain_weight=1.0)
    out = model2(x, y)
    assert out.loss.item() == pytest.approx(
        (out.losses["ce"] + out.losses["info_gain_0"] + out.losses["info_gain_1"]).item(), rel=1e-5)
    out.loss.backward()
    assert all(r.fc2.weight.grad.abs().sum() > 0 for r in model2.routers)
    stats = collect_routing_stats(model2)
    assert set(stats) == {"routers.0", "routers.1"} and stats["routers.1"].load.numel() == 4


def test_trellis_is_configurable_and_validated():
    model = build_model("cigt_lenet", "tiny", paths=(1, 4))
    assert [len(layer) for layer in model.layers] == [1, 4]
    assert model(torch.randn(4, 1, 28, 28)).logits.shape == (4, 10)
    assert [len(layer) for layer in build_model("cigt_lenet", "small", experts=8).layers] == [1, 4, 8]
    with pytest.raises(ValueError, match="must start with 1"):
        CIGTConfig(paths=(2, 4))
    with pytest.raises(ValueError, match="execution must be"):
        CIGTConfig(execution="sparse")
    with pytest.raises(ValueError, match="ep_size must be 1, got 2"):
        build_model("cigt_lenet", "tiny", ep_size=2)
    with pytest.raises(ValueError, match="experts=3 must equal"):
        build_model("cigt_lenet", "tiny", experts=3, paths=(1, 2, 4))
    out = run_routed(build_model("cigt_lenet", "tiny").layers[1], torch.randn(6, 16, 14, 14),
                     torch.tensor([0, 1, 1, 0, 1, 1]))
    assert out.shape == (6, 16, 7, 7)


def test_fast_pools_equal_torch_pools():
    import torch.nn.functional as F

    from condmoe.routing.cigt import GridPool, MaxPool2x2

    for shape in ((3, 4, 14, 14), (2, 3, 7, 7), (2, 3, 9, 12)):
        x = torch.randn(*shape)
        assert torch.allclose(GridPool(7)(x), F.adaptive_avg_pool2d(x, 7), atol=1e-6)
    for shape in ((3, 4, 28, 28), (2, 3, 7, 9)):
        x = torch.randn(*shape)
        assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))


def test_info_gain_term_is_the_papers_loss_at_the_current_temperature():
    """info_gain_<l> = -lambda * (beta * H(p(n)) + H(p(c)) - H(p(c, n))) of the router's softmax(z / T)."""
    torch.manual_seed(0)
    model = build_model("cigt_lenet", "tiny", info_gain_weight=0.7, info_gain_beta=1.5, initial_temperature=3.0)
    model.eval()
    x, y = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    out = model(x, y)
    with torch.no_grad():
        z, probs = model.routers[0](model.layers[0][0](x), model.temperature())
    assert model.temperature() == 3.0 and torch.allclose(probs, (z / 3.0).softmax(-1))
    joint = torch.zeros(10, probs.shape[1], dtype=torch.float64)
    for p_row, c in zip(probs.double(), y.tolist()):
        joint[c] += p_row / len(y)

    def h(p):
        return -(p * torch.log(p + 1e-30)).sum().item()

    expected = -0.7 * (1.5 * h(joint.sum(0)) + h(joint.sum(1)) - h(joint))
    assert out.losses["info_gain_0"].item() == pytest.approx(expected, rel=1e-5)
