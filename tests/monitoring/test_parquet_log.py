"""The Parquet routing log: one file set per run, read with pyarrow.dataset, restarts resolved."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from condmoe.cluster.metrics import MetricsExporter
from condmoe.cluster.parquet_log import ParquetLog, read_routing, read_train, routing_totals


def _metrics(step: int, load: list[float], loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "samples_per_s": 100.0,
            "routing": {"moe": {"kind": "hard", "load": load, "samples": int(sum(load)), "dropped": 1,
                                "early_exits": 0, "entropy": 0.5, "imbalance": 1.5}}}


def test_restarted_attempt_wins_for_the_steps_it_reran(tmp_path):
    first = ParquetLog(tmp_path, flush_rows=2)
    first.set_first_step(0)
    for step in range(1, 5):
        first.add(_metrics(step, [step, 0.0], 1.0))
    first.flush()
    second = ParquetLog(tmp_path)  # resumed from a checkpoint at step 2: steps 3..5 run again
    assert second.attempt > first.attempt
    second.set_first_step(2)
    for step in range(3, 6):
        second.add(_metrics(step, [0.0, step], 2.0), checkpoint=tmp_path / "ck" if step == 5 else None)
    files = sorted(p.name for p in (tmp_path / "monitor" / "routing").iterdir())
    assert len(files) == 3 and all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    raw = pads.dataset(str(tmp_path / "monitor" / "routing"), format="parquet").to_table()
    assert raw.num_rows == 7  # everything written is readable with pyarrow.dataset
    table = read_routing(tmp_path)
    assert table.column("step").to_pylist() == [1, 2, 3, 4, 5]
    assert table.column("load").to_pylist() == [[1, 0], [2, 0], [0, 3], [0, 4], [0, 5]]
    assert table.column("steps").to_pylist() == [1, 1, 1, 1, 1]
    assert read_train(tmp_path).column("loss").to_pylist() == [1.0, 1.0, 2.0, 2.0, 2.0]
    totals = routing_totals(tmp_path)
    assert totals["moe"].load.tolist() == [3.0, 12.0] and totals["moe"].dropped == 5
    assert routing_totals(tmp_path, last_steps=2)["moe"].load.tolist() == [0.0, 9.0]


def test_missing_log_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_routing(tmp_path)
    with pytest.raises(ValueError, match="flush_rows"):
        ParquetLog(tmp_path, flush_rows=0)


def test_second_worker_group_counts_a_restart():
    exporter = MetricsExporter("restarts")
    assert exporter.attach("group-a") is False
    assert exporter.attach("group-a") is False  # the same group again is no restart
    assert exporter.attach("group-b") is True
    assert 'condmoe_worker_restarts_total{job="restarts"} 1.0' in exporter.exposition()
