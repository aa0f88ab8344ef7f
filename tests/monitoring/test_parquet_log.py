"""The Parquet routing log: one file set per run, read with pyarrow.dataset, restarts resolved."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

import torch

from condmoe.cluster.metrics import MetricsExporter
from condmoe.cluster.parquet_log import ParquetLog, read_routing, read_train, routing_totals
from condmoe.routing import RoutingStats
from condmoe.trainer.records import CheckpointRecord, EvalRecord, StepRecord


def _record(step: int, load: list[float], loss: float) -> StepRecord:
    stats = {"moe": RoutingStats.from_load(torch.tensor(load), int(sum(load)), dropped=1)}
    return StepRecord(step=step, steps=1, samples=32, loss=loss, lr=1e-3, epoch=0, samples_per_s=100.0,
                      first_step_time=0.0, routing=stats, routing_steps=[(step, stats)])


def test_restarted_attempt_wins_for_the_steps_it_reran(tmp_path):
    first = ParquetLog(tmp_path, flush_rows=2)
    for step in range(1, 5):
        first.write(_record(step, [step, 0.0], 1.0))
    first.flush()
    second = ParquetLog(tmp_path)  # resumed from a checkpoint at step 2: steps 3..5 run again
    assert second.attempt > first.attempt
    for step in range(3, 6):
        second.write(_record(step, [0.0, step], 2.0))
    second.write(EvalRecord(5, accuracy=0.75, samples=100, macs_per_sample=1e6, exit_rate=0.0))
    second.write(CheckpointRecord(5, tmp_path / "ck", 0.5))
    files = sorted(p.name for p in (tmp_path / "monitor" / "routing").iterdir())
    assert len(files) == 3 and all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    raw = pads.dataset(str(tmp_path / "monitor" / "routing"), format="parquet").to_table()
    assert raw.num_rows == 7  # everything written is readable with pyarrow.dataset
    table = read_routing(tmp_path)
    assert table.column("step").to_pylist() == [1, 2, 3, 4, 5]
    assert table.column("load").to_pylist() == [[1, 0], [2, 0], [0, 3], [0, 4], [0, 5]]
    assert table.column("steps").to_pylist() == [1, 1, 1, 1, 1]
    train = read_train(tmp_path)
    assert train.column("loss").to_pylist() == [1.0, 1.0, 2.0, 2.0, 2.0]
    # the evaluation and the checkpoint of step 5 fill in that step's train row
    assert train.column("eval_accuracy").to_pylist() == [None, None, None, None, 0.75]
    assert train.column("checkpoint").to_pylist()[-1] == str(tmp_path / "ck")
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
