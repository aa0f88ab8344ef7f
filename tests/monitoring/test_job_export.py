"""A real 2-worker Ray job feeds the exporter actor; a real Prometheus scrapes it.

PromQL over Prometheus' HTTP API must return exactly the per-expert counts the
job computed (the routing totals in its final checkpoint), and the run's
Parquet log must sum to the same numbers.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from condmoe.cluster.launch import launch
from condmoe.cluster.metrics import start_job_exporter
from condmoe.cluster.parquet_log import read_routing, read_train, routing_totals
from condmoe.trainer.checkpoint import list_checkpoints, read_meta
from condmoe.trainer.config import load_job

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = 8


@pytest.fixture(scope="module")
def scraped_job(fmnist_shards, ray_local, tmp_path_factory):
    """Run topk_moe (hard routing, ep_size 2) on 2 workers while Prometheus scrapes its exporter."""
    import ray

    from conftest import PROMETHEUS, free_port
    from prom_server import PrometheusServer

    tmp = tmp_path_factory.mktemp("job")
    cfg = load_job(CONFIGS / "topk_moe.yaml", [
        f"data.path={fmnist_shards}", "model.size=tiny", f"optim.steps={STEPS}", "optim.warmup_steps=0",
        "optim.schedule=constant", "data.batch_size=32", "data.eval_batch_size=128", "checkpoint.every=4",
        "metrics.log_every=1", "metrics.eval_batches=1", f"cluster.storage_path={tmp}",
        "cluster.workers=2", "cluster.name=promjob", "metrics.prometheus.port=0"])
    exporter = start_job_exporter(cfg)  # launch() finds and reuses it, so it outlives the run here
    assert exporter.actor is not None and exporter.url.startswith("http://127.0.0.1:")
    port = int(exporter.url.split(":")[2].split("/")[0])
    prom = PrometheusServer(PROMETHEUS, tmp / "prom", [f"127.0.0.1:{port}"], free_port(), "500ms")
    try:
        prom.start()
        t0 = time.monotonic()
        res = launch(cfg)
        seconds = time.monotonic() - t0
        assert res.error is None, res.error
        # the final update reached the exporter before launch returned; wait for Prometheus to see it
        prom.wait_for(f'condmoe_train_last_step{{job="{cfg.run_name}"}}',
                      lambda r: r and float(r[0]["value"][1]) == STEPS, timeout=30)
        queries = {
            "assignments": prom.query(f'condmoe_expert_assignments_total{{job="{cfg.run_name}"}}'),
            "samples": prom.query(f'condmoe_layer_routed_samples_total{{job="{cfg.run_name}"}}'),
            "dropped": prom.query(f'condmoe_layer_dropped_total{{job="{cfg.run_name}"}}'),
            "steps": prom.query(f'condmoe_train_steps_total{{job="{cfg.run_name}"}}'),
            "train_samples": prom.query(f'condmoe_train_samples_total{{job="{cfg.run_name}"}}'),
            "step_count": prom.query(f'condmoe_train_step_duration_seconds_count{{job="{cfg.run_name}"}}'),
            "wait_count": prom.query(f'condmoe_data_wait_seconds_count{{job="{cfg.run_name}"}}'),
            "ckpt_count": prom.query(f'condmoe_checkpoint_duration_seconds_count{{job="{cfg.run_name}"}}'),
            "restarts": prom.query(f'condmoe_worker_restarts_total{{job="{cfg.run_name}"}}'),
            "up": prom.query('up{job="condmoe"}'),
        }
        exposition = ray.get(exporter.actor.exposition.remote(), timeout=30)
        yield {"cfg": cfg, "res": res, "q": queries, "exposition": exposition, "seconds": seconds}
    finally:
        prom.stop()
        exporter.stop(final_scrape_timeout_s=0)


def _by_layer_expert(result: list[dict]) -> dict[tuple[str, int], float]:
    return {(r["metric"]["layer"], int(r["metric"]["expert"])): float(r["value"][1]) for r in result}


def test_promql_per_expert_counts_equal_the_jobs_own(scraped_job):
    cfg, q = scraped_job["cfg"], scraped_job["q"]
    totals = read_meta(list_checkpoints(cfg.checkpoint_dir)[-1])["routing"]  # what the job computed
    assert totals, "the job recorded no routing totals"
    got = _by_layer_expert(q["assignments"])
    want = {(layer, e): v for layer, d in totals.items() for e, v in enumerate(d["load"])}
    assert set(got) == set(want)
    assert got == want  # integer counts, exact
    assert sum(want.values()) > 0
    samples = {r["metric"]["layer"]: float(r["value"][1]) for r in q["samples"]}
    assert samples == {layer: d["samples"] for layer, d in totals.items()}
    dropped = {r["metric"]["layer"]: float(r["value"][1]) for r in q["dropped"]}
    assert dropped == {layer: d["dropped"] for layer, d in totals.items()}
    # no per-rank label: one series per (layer, expert)
    assert all("rank" not in r["metric"] for r in q["assignments"])


def test_training_counters_and_histograms(scraped_job):
    cfg, q = scraped_job["cfg"], scraped_job["q"]
    value = lambda name: float(q[name][0]["value"][1])  # noqa: E731
    assert value("steps") == STEPS
    assert value("train_samples") == STEPS * cfg.data.batch_size
    assert value("step_count") == STEPS            # rank 0: one observation per step
    assert value("wait_count") == 2 * STEPS        # every rank: one per batch
    assert value("ckpt_count") == 2                # steps 4 and 8
    assert value("restarts") == 0
    assert [float(r["value"][1]) for r in q["up"]] == [1.0]


def test_parquet_log_matches_the_job(scraped_job):
    cfg = scraped_job["cfg"]
    totals = read_meta(list_checkpoints(cfg.checkpoint_dir)[-1])["routing"]
    table = read_routing(cfg.run_dir)
    assert sorted(set(table.column("step").to_pylist())) == list(range(1, STEPS + 1))
    assert table.num_rows == STEPS * len(totals)
    summed = routing_totals(cfg.run_dir)
    assert {n: s.load.tolist() for n, s in summed.items()} == {n: d["load"] for n, d in totals.items()}
    train = read_train(cfg.run_dir)
    assert train.column("step").to_pylist() == list(range(1, STEPS + 1))
    assert all(v is not None and v > 0 for v in train.column("loss").to_pylist())
    assert train.column("eval_accuracy").to_pylist()[-1] is not None
