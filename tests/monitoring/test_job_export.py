"""A real 2-worker Ray job feeds the exporter actor; a real Prometheus scrapes it.

PromQL over Prometheus' HTTP API must return exactly the per-expert counts the
job computed (the routing totals in its final checkpoint), and the run's
Parquet log must sum to the same numbers.
"""

from __future__ import annotations

import pytest

from condmoe.cluster.parquet_log import read_routing, read_train, routing_totals
from condmoe.trainer.checkpoint import list_checkpoints, read_meta
from prom_server import JOB_STEPS as STEPS

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


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


def test_condmoe_experts_on_the_finished_run_and_its_exporter(scraped_job, capsys):
    from condmoe.cluster.cli import main

    cfg = scraped_job["cfg"]
    totals = read_meta(list_checkpoints(cfg.checkpoint_dir)[-1])["routing"]
    assert main(["experts", str(cfg.run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"step {STEPS}" in out and all(layer in out for layer in totals)
    imbalance = {n: s.imbalance for n, s in routing_totals(cfg.run_dir).items()}
    assert all(f"{v:.2f}" in out for v in imbalance.values())
    assert main(["experts", scraped_job["url"], "--job", cfg.run_name]) == 0
    live = capsys.readouterr().out
    assert f"step {STEPS}" in live and all(f"{v:.2f}" in live for v in imbalance.values())


def test_condmoe_report_writes_nonempty_pngs(scraped_job, capsys, tmp_path):
    from PIL import Image

    from condmoe.cluster.cli import main

    cfg = scraped_job["cfg"]
    assert main(["report", str(cfg.run_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"steps: {STEPS}" in out and "eval accuracy" in out and "imbalance" in out
    names = {"expert_load.png", "imbalance.png", "entropy.png", "loss.png", "accuracy.png"}
    assert {p.name for p in tmp_path.glob("*.png")} == names
    for name in names:
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            assert im.width > 100 and im.height > 100
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 50, f"{name} is a blank image"
