"""The exporter on its own, fed by real RoutingStats of a real CondConv network on Fashion-MNIST.

A real Prometheus scrapes it: summed routing weights per expert equal the model's own stats;
imbalance/entropy gauges equal RoutingStats' properties; ``condmoe experts URL`` rebuilds them.
"""

from __future__ import annotations

import pytest

from condmoe.cluster.cli import main
from condmoe.cluster.metrics import JobMetrics, MetricsExporter, parse_exposition

from prom_server import free_port

pytestmark = [pytest.mark.timeout(120)]


def test_prometheus_scrapes_soft_routing_weights(soft_updates, prometheus):
    updates, totals, last = soft_updates
    exporter = MetricsExporter("softjob", "127.0.0.1", free_port())
    try:
        url = exporter.start()
        assert url == f"http://127.0.0.1:{exporter.port}/metrics"
        prom = prometheus([f"127.0.0.1:{exporter.port}"], interval="250ms")
        for u in updates:
            exporter.update(u)
        prom.wait_for('condmoe_train_steps_total{job="softjob"}', lambda r: r and float(r[0]["value"][1]) == 3)
        res = prom.query('condmoe_expert_routing_weight_total{job="softjob"}')
        got = {(r["metric"]["layer"], int(r["metric"]["expert"])): float(r["value"][1]) for r in res}
        want = {(n, e): v for n, s in totals.items() for e, v in enumerate(s.load.tolist())}
        assert set(got) == set(want) and len(want) == 8 * len(totals)
        for key, v in want.items():
            assert got[key] == pytest.approx(v, rel=1e-12), key
        imb = {r["metric"]["layer"]: float(r["value"][1])
               for r in prom.query('condmoe_layer_load_imbalance_ratio{job="softjob"}')}
        ent = {r["metric"]["layer"]: float(r["value"][1])
               for r in prom.query('condmoe_layer_routing_entropy_ratio{job="softjob"}')}
        assert imb == pytest.approx({n: s.imbalance for n, s in last.items()})
        assert ent == pytest.approx({n: s.entropy for n, s in last.items()})
        mean = {(r["metric"]["layer"], int(r["metric"]["expert"])): float(r["value"][1])
                for r in prom.query('condmoe_expert_routing_weight_mean{job="softjob"}')}
        # CondConv's sigmoid routing: each expert's mean weight over the last update's 64 samples
        assert mean == pytest.approx({(n, e): v / 64 for n, s in last.items() for e, v in enumerate(s.load.tolist())})
        assert all(0.0 < v < 1.0 for v in mean.values())
        waits = prom.query('condmoe_data_wait_seconds_count{job="softjob"}')
        assert float(waits[0]["value"][1]) == 6
        assert exporter.scrape_state()["scrapes"] > 0
    finally:
        exporter.stop()


def test_condmoe_experts_reads_a_live_exporter(soft_updates, capsys):
    updates, totals, _ = soft_updates
    exporter = MetricsExporter("softjob", "127.0.0.1", 0)
    try:
        exporter.start()
        for u in updates:
            exporter.update(u)
        rebuilt = parse_exposition(exporter.exposition())
        assert set(rebuilt) == set(totals)
        for n, s in totals.items():
            assert rebuilt[n].load.tolist() == pytest.approx(s.load.tolist(), rel=1e-12)
        assert all(s.kind == "soft" and s.samples == 192 for s in rebuilt.values())
        assert main(["experts", exporter.url]) == 0
        out = capsys.readouterr().out
        assert "step 3" in out and all(name in out for name in totals)
        assert main(["experts", exporter.url, "--watch", "--interval", "0.05", "--iterations", "2"]) == 0
    finally:
        exporter.stop()


def test_taken_port_falls_back_to_a_free_one():
    first = MetricsExporter("a", "127.0.0.1", 0)
    first.start()
    try:
        second = MetricsExporter("b", "127.0.0.1", first.port)
        second.start()
        try:
            assert second.port != first.port and second.port > 0
        finally:
            second.stop()
    finally:
        first.stop()


def test_bad_input_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="70000"):
        MetricsExporter("x", port=70000)
    with pytest.raises(ValueError, match="non-empty job"):
        JobMetrics("")
    with pytest.raises(ValueError, match="negative"):
        JobMetrics("x").apply({"bad_samples": {"bad_image": -1}})
    assert main(["experts", "/nonexistent/run"]) == 2
    assert "/nonexistent/run" in capsys.readouterr().err
    assert main(["report", "/nonexistent/run"]) == 2
