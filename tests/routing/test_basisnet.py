"""BasisNet: early exit thresholds, batch independence, joint loss, stats, threshold tuning."""

from __future__ import annotations

import pytest
import torch

from condmoe.routing import build_model, collect_routing_stats
from condmoe.routing.basisnet import BasisNetConfig
from condmoe.routing.early_exit import tune_exit_threshold


def _model(**cfg):
    torch.manual_seed(0)
    return build_model("basisnet_cnn", "tiny", experts=4, **cfg)


def test_threshold_zero_exits_everyone_and_above_one_nobody():
    x = torch.randn(16, 1, 28, 28)
    m = _model(exit_threshold=0.0).eval()
    out = m(x)
    assert out.exited.all()
    light, _ = m.light(x)
    torch.testing.assert_close(out.logits, light)
    st = collect_routing_stats(m)["coefficients"]
    assert st.early_exits == 16 and st.load.sum().item() == 0
    m.config = BasisNetConfig(num_bases=4, exit_threshold=1.01, light_channels=(8, 16, 32))
    out = m(x)
    assert not out.exited.any()
    st = collect_routing_stats(m)["coefficients"]
    assert st.early_exits == 0 and st.load.sum().item() == pytest.approx(16.0)  # softmax rows sum to 1


def test_specialist_output_does_not_depend_on_batch_mates():
    m = _model(exit_threshold=1.01).eval()
    x = torch.randn(10, 1, 28, 28)
    full = m(x).logits
    alone = torch.cat([m(x[i : i + 1]).logits for i in range(10)])
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-5)
    # with a mid threshold (some exit, some not), each sample's answer is the same as alone
    conf, _ = m.exit_scores(x)
    m.config = BasisNetConfig(num_bases=4, exit_threshold=conf.median().item(), light_channels=(8, 16, 32))
    mixed = m(x)
    assert 0 < int(mixed.exited.sum()) < 10
    alone = torch.cat([m(x[i : i + 1]).logits for i in range(10)])
    torch.testing.assert_close(mixed.logits, alone, rtol=1e-5, atol=1e-5)


def test_joint_loss_and_distillation_components():
    m = _model(light_loss_weight=0.5, distill_weight=0.3).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    out = m(x, y)
    expected = out.losses["ce"] + 0.5 * out.losses["ce_light"] + 0.3 * out.losses["distill"]
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert m.light.classifier.weight.grad.abs().sum() > 0
    assert m.coefficients.fc.weight.grad.abs().sum() > 0  # coefficients learn through the specialist


def test_coefficient_dropout_keeps_rows_normalised():
    m = _model(coefficient_dropout=0.5).train()
    feats = torch.randn(32, m.light.out_features)
    c = m.coefficients(feats).weights
    torch.testing.assert_close(c.sum(-1), torch.ones(32))
    assert (c == 0).any()


@pytest.mark.parametrize("field, value", [("num_bases", 1), ("temperature", 0.0), ("coefficient_dropout", 1.0),
                                           ("light_input_scale", 1.5), ("exit_threshold", -0.1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BasisNetConfig(**{field: value})


def test_tune_exit_threshold_picks_most_exits_within_budget():
    conf = torch.tensor([0.99, 0.95, 0.9, 0.8, 0.6, 0.5])
    early = torch.tensor([True, True, True, False, False, False])
    final = torch.tensor([True, True, True, True, True, False])
    t = tune_exit_threshold(conf, early, final, max_accuracy_drop=0.0)
    # exiting the top 3 costs nothing; the 4th would lose a sample
    assert t.threshold == pytest.approx(0.9) and t.exit_rate == pytest.approx(0.5)
    assert t.accuracy == pytest.approx(5 / 6) == t.full_accuracy
    loose = tune_exit_threshold(conf, early, final, max_accuracy_drop=0.2)
    assert loose.exit_rate == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="three"):
        tune_exit_threshold(conf, early[:2], final)
