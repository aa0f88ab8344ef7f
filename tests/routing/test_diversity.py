"""Soft-routing diversity: how much the per-image routing mixtures differ, summable over steps and ranks."""

from __future__ import annotations

import math

import pytest
import torch

from condmoe.routing import RoutingStats, accumulate_stats, build_model, collect_routing_stats


def _pooled(weights: torch.Tensor) -> tuple[float, float]:
    """The plain definition on all images at once: RMS distance of p_i from their mean over
    sqrt(1 - 1/E), and the mean entropy of p_i over log E."""
    p = weights.double() / weights.double().sum(-1, keepdim=True)
    e = p.shape[1]
    rms = (p - p.mean(0)).pow(2).sum(-1).mean().sqrt().item()
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1).mean().item()
    return rms / math.sqrt(1 - 1 / e), ent / math.log(e)


def test_same_mixture_for_every_image_has_no_diversity():
    w = torch.tensor([[0.2, 0.5, 0.9, 0.4]]).repeat(32, 1)  # sigmoid-like, not normalised
    s = RoutingStats.from_weights(w)
    assert s.diversity == pytest.approx(0.0, abs=1e-6)
    assert s.load.tolist() == pytest.approx((w.sum(0)).tolist())
    assert s.samples == 32 and s.kind == "soft"
    # a scaled copy of the same mixture is the same mixture
    assert RoutingStats.from_weights(w * torch.linspace(0.1, 1.0, 32)[:, None]).diversity == pytest.approx(0, abs=1e-6)
    uniform = RoutingStats.from_weights(torch.ones(8, 4))
    assert uniform.diversity == pytest.approx(0.0, abs=1e-6) and uniform.mixture_entropy == pytest.approx(1.0)


def test_one_hot_per_image_is_maximal():
    e = 4
    w = torch.eye(e).repeat(8, 1)  # every image one expert, experts used equally
    s = RoutingStats.from_weights(w)
    assert s.diversity == pytest.approx(1.0)
    assert s.mixture_entropy == pytest.approx(0.0)
    # anything else is below: random mixtures, or one-hot with unequal use
    torch.manual_seed(0)
    assert RoutingStats.from_weights(torch.rand(64, e)).diversity < 0.5
    skewed = RoutingStats.from_weights(torch.eye(e)[torch.tensor([0, 0, 0, 1])])
    assert 0 < skewed.diversity < 1


def test_matches_the_pooled_definition():
    torch.manual_seed(1)
    w = torch.softmax(torch.randn(50, 6) * 2, -1)
    s = RoutingStats.from_weights(w)
    div, ent = _pooled(w)
    assert s.diversity == pytest.approx(div, rel=1e-9)
    assert s.mixture_entropy == pytest.approx(ent, rel=1e-9)


def test_sums_over_steps_and_ranks_equal_the_whole():
    """Two 'ranks' x two 'steps' of different images: the sum is the stats of all images at once,
    also after the flat-tensor round trip an all-reduce takes and the dict a checkpoint stores."""
    torch.manual_seed(2)
    parts = [torch.sigmoid(torch.randn(n, 5) * 3) for n in (7, 9, 4, 12)]
    whole = RoutingStats.from_weights(torch.cat(parts))
    summed = RoutingStats.from_tensor(sum(RoutingStats.from_weights(p).to_tensor() for p in parts), kind="soft")
    for s in (summed, RoutingStats.from_dict(summed.as_dict())):
        assert s.samples == whole.samples == 32 and s.mix_count == 32
        assert s.diversity == pytest.approx(whole.diversity, rel=1e-9)
        assert s.mixture_entropy == pytest.approx(whole.mixture_entropy, rel=1e-9)
        assert s.load.tolist() == pytest.approx(whole.load.tolist())
    added = accumulate_stats({"r": RoutingStats.from_weights(parts[0])}, {"r": RoutingStats.from_weights(parts[1])})
    assert added["r"].diversity == pytest.approx(RoutingStats.from_weights(torch.cat(parts[:2])).diversity, rel=1e-9)


def test_layers_without_mixtures_report_none_and_add_cleanly():
    hard = RoutingStats.from_load(torch.tensor([3.0, 1.0]), 4)
    assert hard.diversity is None and hard.mixture_entropy is None
    d = hard.as_dict()
    assert d["diversity"] is None and RoutingStats.from_dict(d).mix_sum is None
    back = RoutingStats.from_tensor(hard.to_tensor())
    assert back.mix_count == 0 and back.diversity is None
    # a checkpoint's meta written before the mixture fields still loads
    old = {k: d[k] for k in ("kind", "load", "samples", "dropped", "early_exits", "entropy", "imbalance")}
    assert RoutingStats.from_dict(old).diversity is None
    soft = RoutingStats.from_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), kind="hard")
    assert (hard + soft).diversity == pytest.approx(soft.diversity)


def test_early_exits_count_only_the_images_that_used_the_weights():
    w = torch.eye(3)
    s = RoutingStats.from_weights(w, 10, early_exits=7)
    assert s.samples == 10 and s.early_exits == 7 and s.mix_count == 3 and s.diversity == pytest.approx(1.0)


def test_condconv_and_basisnet_routers_record_diversity():
    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    for name in ("condconv_cnn", "basisnet_cnn"):
        model = build_model(name, "tiny", experts=4).eval()
        model(x)
        stats = collect_routing_stats(model)
        assert stats, name
        for layer, s in stats.items():
            assert s.mix_count == 6 and 0.0 <= s.diversity <= 1.0 and 0.0 <= s.mixture_entropy <= 1.0, layer


def test_tracker_flat_layout_carries_the_mixtures():
    """The tracker's one flat tensor per interval holds every layer's 2E + 6 values (+ a ran-here count)."""
    from condmoe.trainer.routing_tracker import RoutingTracker

    torch.manual_seed(3)
    soft = RoutingStats.from_weights(torch.rand(5, 4))
    hard = RoutingStats.from_load(torch.tensor([2.0, 3.0]), 5)
    tracker = RoutingTracker()
    tracker._layout = {"hard": (2, "hard"), "soft": (4, "soft")}
    steps = [(1, 0.5, {"soft": soft, "hard": hard}), (2, 0.4, {"hard": hard})]
    flat, layout = tracker._pack(steps, False)
    assert flat.numel() == 1 + 2 * (1 + RoutingStats.tensor_size(2) + 1 + RoutingStats.tensor_size(4) + 1)
    out = RoutingTracker._unpack(flat, steps, layout)
    assert out[0][2]["soft"].diversity == pytest.approx(soft.diversity)
    assert out[0][2]["hard"].diversity is None and "soft" not in out[1][2]


def test_parquet_log_prometheus_and_experts_view_carry_diversity(tmp_path):
    """Each step's row holds the diversity and its summable parts; run totals are exact; the exporter's
    gauges and counters give the same run totals back (condmoe experts URL); promtool finds no problem."""
    import shutil
    import subprocess

    from rich.console import Console

    from condmoe.cluster.expert_view import expert_table
    from condmoe.cluster.metrics import JobMetrics, parse_exposition
    from condmoe.cluster.parquet_log import ParquetLog, read_routing, routing_totals
    from condmoe.trainer.records import StepRecord

    torch.manual_seed(4)
    batches = [torch.softmax(torch.randn(8, 4) * 2, -1) for _ in range(3)]
    log, metrics = ParquetLog(tmp_path), JobMetrics("div")
    for step, w in enumerate(batches, 1):
        st = {"router": RoutingStats.from_weights(w), "gate": RoutingStats.from_load(torch.tensor([5.0, 3.0]), 8)}
        log.write(StepRecord(step=step, steps=1, samples=8, loss=1.0, lr=1e-3, epoch=0, samples_per_s=1.0,
                             first_step_time=0.0, routing=st, routing_steps=[(step, st)]))
        metrics.apply({"routing": st})
    log.close()
    whole = RoutingStats.from_weights(torch.cat(batches))
    rows = [r for r in read_routing(tmp_path).to_pylist() if r["layer"] == "router"]
    assert [r["diversity"] for r in rows] == pytest.approx([RoutingStats.from_weights(w).diversity for w in batches])
    assert all(r["diversity"] is None for r in read_routing(tmp_path).to_pylist() if r["layer"] == "gate")
    totals = routing_totals(tmp_path)
    assert totals["router"].diversity == pytest.approx(whole.diversity, rel=1e-9)
    assert totals["gate"].diversity is None
    text = metrics.exposition()
    assert "condmoe_layer_routing_diversity_ratio" in text and "condmoe_layer_mixture_entropy_ratio" in text
    scraped = parse_exposition(text)
    assert scraped["router"].diversity == pytest.approx(whole.diversity, rel=1e-6)
    assert scraped["router"].mixture_entropy == pytest.approx(whole.mixture_entropy, rel=1e-6)
    console = Console(record=True, width=200)
    console.print(expert_table(totals))
    shown = console.export_text()
    assert "diversity" in shown and f"{whole.diversity:.2f}" in shown
    promtool = shutil.which("promtool") or shutil.which("/usr/bin/promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make setup installs it)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
