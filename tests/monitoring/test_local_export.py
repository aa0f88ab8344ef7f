"""No Ray: rank 0 of a plain train() serves the exporter; a real Prometheus scrapes it.

Hard routing with early exits (coe_cnn): per-expert assignments and early exits in Prometheus
equal the job's own totals; soft routing (condconv_cnn): summed routing weights equal them too; a missing shard shows up as skipped bad samples by reason; ``promtool check metrics``
finds no problem in the live exposition.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from prom_server import LOCAL_STEPS as STEPS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_exporter_url_logged_and_bound_to_loopback(local_job):
    url = local_job["result"]["url"]
    assert url.startswith("http://127.0.0.1:")
    assert f"Prometheus exporter for job localjob: {url}" in local_job["log"]


def test_hard_routing_counts_in_prometheus_equal_the_jobs_totals(local_job):
    routing, q = local_job["result"]["routing"], local_job["q"]
    assert routing and all(d["kind"] == "hard" for d in routing.values())
    got = {(r["metric"]["layer"], int(r["metric"]["expert"])): float(r["value"][1]) for r in q["assignments"]}
    want = {(layer, e): v for layer, d in routing.items() for e, v in enumerate(d["load"])}
    assert got == want and sum(want.values()) > 0
    exits = {r["metric"]["layer"]: float(r["value"][1]) for r in q["exits"]}
    assert exits == {layer: d["early_exits"] for layer, d in routing.items()}
    assert float(q["steps"][0]["value"][1]) == STEPS


def test_missing_shard_counted_as_bad_samples_by_reason(local_job):
    bad = {r["metric"]["reason"]: float(r["value"][1]) for r in local_job["q"]["bad"]}
    assert bad.get("missing_shard", 0) > 0, bad


def test_promtool_finds_no_problem(local_job):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    proc = subprocess.run([promtool, "check", "metrics"], input=local_job["exposition"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_soft_routing_weights_in_prometheus_equal_the_jobs_totals(soft_local_job):
    routing, q = soft_local_job["result"]["routing"], soft_local_job["q"]
    assert routing and all(d["kind"] == "soft" for d in routing.values())
    got = {(r["metric"]["layer"], int(r["metric"]["expert"])): float(r["value"][1]) for r in q["weights"]}
    want = {(layer, e): v for layer, d in routing.items() for e, v in enumerate(d["load"])}
    assert set(got) == set(want)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-9), key
    samples = {r["metric"]["layer"]: float(r["value"][1]) for r in q["samples"]}
    assert samples == {layer: d["samples"] for layer, d in routing.items()}
    mean = [float(r["value"][1]) for r in q["mean"]]
    assert len(mean) == len(want) and all(0.0 < m < 1.0 for m in mean)  # sigmoid routing weights


def test_parquet_log_has_one_routing_row_per_step_even_between_reports(local_job):
    # the job reports every 2 steps (metrics.log_every=2) but the Parquet log holds every step
    from condmoe.cluster.parquet_log import read_routing, routing_totals

    table = read_routing(local_job["run_dir"])
    routing = local_job["result"]["routing"]
    steps = table.column("step").to_pylist()
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    assert set(table.column("steps").to_pylist()) == {1}
    per_step_samples = {(r["step"], r["layer"]): r["samples"] for r in table.to_pylist()}
    assert all(v == 32 for v in per_step_samples.values())  # data.batch_size=32 per step, all ranks
    summed = routing_totals(local_job["run_dir"])
    assert {n: s.load.tolist() for n, s in summed.items()} == {n: d["load"] for n, d in routing.items()}
