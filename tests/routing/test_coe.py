"""CoE: one-expert reference, hard top-1 routing, early exit counts and multiply-adds, WGM/LGM/VCM."""

from __future__ import annotations

import pytest
import torch

from condmoe.routing import CoEConfig, build_model, collect_routing_stats, count_macs
from condmoe.routing.coe import balanced_assignment



def _coe(**options):
    torch.manual_seed(0)
    return build_model("coe_cnn", "tiny", experts=options.pop("experts", 4), dropout=0.0, **options)


def test_one_expert_without_exit_equals_that_expert():
    model = _coe(experts=1)
    expert = model.experts.local_experts[0]
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    model.eval()
    assert torch.allclose(model(x).logits, expert(x), atol=1e-6)
    model.train()
    out = model(x, y)
    expert.train()
    assert torch.allclose(out.logits, expert(x), atol=1e-5)
    # WGM weights are all 1 with one expert: the expert loss is plain cross-entropy
    assert out.losses["expert_ce"].item() == pytest.approx(out.losses["ce"].item(), rel=1e-5)


def test_only_the_selected_expert_runs_on_each_sample():
    model = _coe(experts=4)
    model.eval()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():  # make the delegator pick different experts for different samples
        feats = model.delegator.features(x)
        model.delegator.select.weight.normal_(0, 5.0)
        model.delegator.select.bias.copy_(-model.delegator.select.weight @ feats.mean(0))
    seen = {}
    for gid, expert in zip(model.experts.global_ids(), model.experts.local_experts):
        expert.register_forward_hook(lambda m, i, o, g=gid: seen.__setitem__(g, i[0].shape[0]))
    out = model(x)
    routing, _ = model.route(x)
    selected = routing.indices[:, 0]
    counts = torch.bincount(selected, minlength=4)
    assert (counts > 0).sum() >= 2
    assert seen == {e: int(c) for e, c in enumerate(counts.tolist()) if c > 0}
    for e in range(4):  # each sample's logits are its expert's
        rows = selected == e
        if rows.any():
            assert torch.allclose(out.logits[rows], model.experts.local_experts[e](x[rows]), atol=1e-5)
    assert collect_routing_stats(model)["root"].load.tolist() == counts.double().tolist()


@pytest.mark.parametrize("vcm", ["learned", "entropy"])
def test_early_exit_counts_and_macs_on_a_constructed_batch(vcm):
    model = _coe(experts=4, vcm=vcm)
    model.eval()
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad():
        unc = model.uncertainty(model.delegator(x))
    threshold = float(unc.sort().values[14])  # the 15 least uncertain samples exit
    model.config = CoEConfig(**{**model.config.__dict__, "exit_threshold": threshold})
    out = model(x)
    assert out.exited is not None and int(out.exited.sum()) == 15
    assert torch.equal(out.exited, unc <= threshold)
    stats = collect_routing_stats(model)["root"]
    assert stats.early_exits == 15 and stats.samples == 40 and stats.load.sum() == 25
    with torch.no_grad():
        rough = model.delegator(x).rough_logits
    assert torch.allclose(out.logits[out.exited], rough[out.exited])
    # multiply-adds: delegator on every sample, one expert on each of the 25 that stay
    delegator = count_macs(model.delegator, x).per_sample
    expert = count_macs(model.experts.local_experts[0], x).per_sample
    assert count_macs(model, x).per_sample == pytest.approx(delegator + expert * 25 / 40)
    model.config = CoEConfig(**{**model.config.__dict__, "exit_threshold": 1.0})
    assert count_macs(model, x).per_sample == pytest.approx(delegator)  # everyone exits
    model.config = CoEConfig(**{**model.config.__dict__, "exit_threshold": None})
    assert count_macs(model, x).per_sample == pytest.approx(delegator + expert)
    conf, pred = model.exit_scores(x)
    assert torch.allclose(conf, 1 - unc) and pred.shape == (40,)


def test_balanced_assignment_respects_capacity_and_prefers_low_loss():
    losses = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]])
    assert balanced_assignment(losses, 4).tolist() == [0, 0, 0, 1]  # unconstrained argmin
    # capacity 2: expert 0 takes its two cheapest samples, the third goes to expert 1
    assert balanced_assignment(losses, 2).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_assignment(losses, 1)


def test_training_losses_and_gradients_reach_every_part():
    model = _coe(experts=4)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    out = model(x, y)
    assert set(out.losses) == {"expert_ce", "selection", "rough_ce", "vcm", "ce"}
    cfg = model.config
    expected = (out.losses["expert_ce"] + cfg.selection_loss_weight * out.losses["selection"]
                + cfg.rough_loss_weight * out.losses["rough_ce"] + cfg.vcm_loss_weight * out.losses["vcm"])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert out.exited is None


def test_bad_config_raises():
    with pytest.raises(ValueError, match="lgm must be"):
        CoEConfig(lgm="hungarian")
    with pytest.raises(ValueError, match="vcm must be"):
        CoEConfig(vcm="mc")
    with pytest.raises(ValueError, match="exit_threshold must be"):
        CoEConfig(exit_threshold=2.0)
    with pytest.raises(ValueError, match="ep_size=3"):
        _coe(experts=4, ep_size=3)
    with pytest.raises(ValueError, match="norm must be"):
        _coe(norm="layer")


def test_delegator_input_scale_previews_a_smaller_image():
    full, half = _coe(experts=2), _coe(experts=2, delegator_scale=0.5)
    x = torch.randn(8, 1, 28, 28)
    full.eval(), half.eval()
    assert count_macs(half.delegator, x).per_sample < 0.4 * count_macs(full.delegator, x).per_sample
    assert half(x).logits.shape == (8, 10)
    with pytest.raises(ValueError, match="input_scale must be in"):
        _coe(delegator_scale=0.0)
