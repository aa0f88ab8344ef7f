"""The run's routing history as Parquet: one file set per run, read with ``pyarrow.dataset``.

Layout under the run directory::

    monitor/routing/part-<attempt>-<seq>.parquet   one row per (optimiser step, routed layer)
    monitor/train/part-<attempt>-<seq>.parquet     one row per report (loss, throughput, eval)

Routing rows hold each step's stats summed over all ranks (a StepRecord's
``routing_steps``: the train loop all-reduces an interval's steps in one
collective); a train row covers the ``steps`` optimiser steps since the
previous StepRecord (the loop reports every ``metrics.log_every`` steps).
Rows are buffered and written as a new file at each checkpoint, every
``flush_rows`` train rows and at the end, so a crash loses at most the rows
since the last checkpoint. After a restart the resumed attempt rewrites steps
the failed one had already logged; :func:`read_routing` / :func:`read_train` keep the newest attempt's
row for each step.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from condmoe.trainer.records import CheckpointRecord, EvalRecord, Record, StepRecord

log = logging.getLogger(__name__)

ROUTING_SCHEMA = pa.schema([
    ("step", pa.int64()), ("steps", pa.int64()), ("time", pa.timestamp("ms", tz="UTC")),
    ("attempt", pa.int64()), ("layer", pa.string()), ("kind", pa.string()), ("experts", pa.int32()),
    ("load", pa.list_(pa.float64())), ("samples", pa.int64()), ("dropped", pa.int64()),
    ("early_exits", pa.int64()), ("entropy", pa.float64()), ("imbalance", pa.float64()),
    # routing diversity (RoutingStats.from_weights; null for layers without per-image weights) and the
    # summable parts it is derived from, so routing_totals() aggregates it exactly
    ("diversity", pa.float64()), ("mixture_entropy", pa.float64()), ("mix_sum", pa.list_(pa.float64())),
    ("mix_sq", pa.float64()), ("mix_entropy", pa.float64()), ("mix_count", pa.int64()),
])
TRAIN_SCHEMA = pa.schema([
    ("step", pa.int64()), ("steps", pa.int64()), ("time", pa.timestamp("ms", tz="UTC")),
    ("attempt", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()), ("samples_per_s", pa.float64()),
    ("eval_accuracy", pa.float64()), ("eval_macs_per_sample", pa.float64()), ("eval_exit_rate", pa.float64()),
    ("checkpoint", pa.string()),
])


def monitor_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "monitor"


def _mixture_columns(s) -> dict[str, Any]:
    """The diversity columns of one routing row (see ROUTING_SCHEMA)."""
    return {"diversity": s.diversity, "mixture_entropy": s.mixture_entropy,
            "mix_sum": None if s.mix_sum is None else s.mix_sum.tolist(), "mix_sq": s.mix_sq,
            "mix_entropy": s.mix_entropy, "mix_count": s.mix_count}


class ParquetLog:
    """Rank 0's sink: StepRecords become routing rows and a train row; :meth:`flush` writes a new file.

    An EvalRecord or CheckpointRecord of the same step fills in the pending train
    row; a checkpoint also flushes, so the files on disk cover every checkpoint.
    """

    def __init__(self, run_dir: str | Path, *, flush_rows: int = 512) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        self.root = monitor_dir(run_dir)
        self.flush_rows = flush_rows
        self.attempt = time.time_ns()
        self._seq = 0
        self._routing: list[dict[str, Any]] = []
        self._train: list[dict[str, Any]] = []

    def write(self, record: Record) -> None:
        if isinstance(record, StepRecord):
            base = {"time": int(record.time * 1000), "attempt": self.attempt}
            for step, stats in record.routing_steps:
                for layer, s in stats.items():
                    self._routing.append({**base, "step": step, "steps": 1, "layer": layer, "kind": s.kind,
                                          "experts": s.num_experts, "load": s.load.tolist(),
                                          "samples": s.samples, "dropped": s.dropped,
                                          "early_exits": s.early_exits, "entropy": s.entropy,
                                          "imbalance": s.imbalance, **_mixture_columns(s)})
            if len(self._train) >= self.flush_rows:
                self.flush()
            self._train.append({**base, "step": record.step, "steps": record.steps, "loss": record.loss,
                                "lr": record.lr, "samples_per_s": record.samples_per_s,
                                "eval_accuracy": None, "eval_macs_per_sample": None, "eval_exit_rate": None,
                                "checkpoint": None})
        elif isinstance(record, EvalRecord):
            self._pending(record.step).update(eval_accuracy=record.accuracy,
                                              eval_macs_per_sample=record.macs_per_sample,
                                              eval_exit_rate=record.exit_rate)
        elif isinstance(record, CheckpointRecord):
            self._pending(record.step)["checkpoint"] = None if record.path is None else str(record.path)
            self.flush()

    def _pending(self, step: int) -> dict[str, Any]:
        """The train row of ``step`` (a new one when the step had no StepRecord in this attempt)."""
        if self._train and self._train[-1]["step"] == step:
            return self._train[-1]
        row = {"step": step, "steps": 0, "time": int(time.time() * 1000), "attempt": self.attempt,
               **{k: None for k in ("loss", "lr", "samples_per_s", "eval_accuracy", "eval_macs_per_sample",
                                    "eval_exit_rate", "checkpoint")}}
        self._train.append(row)
        return row

    def close(self) -> None:
        self.flush()

    def flush(self) -> None:
        if not self._train and not self._routing:
            return
        name = f"part-{self.attempt}-{self._seq:05d}.parquet"
        for sub, rows, schema in (("routing", self._routing, ROUTING_SCHEMA), ("train", self._train, TRAIN_SCHEMA)):
            if not rows:
                continue
            folder = self.root / sub
            folder.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pylist(rows, schema=schema)
            tmp = folder / f".{name}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, folder / name)  # readers never see half a file
        self._seq += 1
        self._routing, self._train = [], []


def _read(run_dir: str | Path, sub: str, schema: pa.Schema, keys: list[str]) -> pa.Table:
    folder = monitor_dir(run_dir) / sub
    if not folder.is_dir() or not any(folder.glob("part-*.parquet")):
        raise FileNotFoundError(f"no Parquet routing log under {str(folder)!r} (is {str(run_dir)!r} a run dir?)")
    table = pads.dataset(str(folder), format="parquet", schema=schema,
                         exclude_invalid_files=False, ignore_prefixes=["."]).to_table()
    if table.num_rows == 0:
        return table
    # newest attempt wins for each step (a restarted attempt re-runs steps after its checkpoint)
    table = table.sort_by([("step", "ascending"), ("attempt", "descending")])
    seen: set[tuple] = set()
    keep: list[int] = []
    cols = [table.column(k).to_pylist() for k in keys]
    for i, key in enumerate(zip(*cols)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return table.take(pa.array(keep, pa.int64()))


def read_routing(run_dir: str | Path) -> pa.Table:
    """All routing rows of a run (one per step and layer), sorted by step."""
    return _read(run_dir, "routing", ROUTING_SCHEMA, ["step", "layer"])


def read_train(run_dir: str | Path) -> pa.Table:
    """All training rows of a run (one per report), sorted by step."""
    return _read(run_dir, "train", TRAIN_SCHEMA, ["step"])


def routing_totals(run_dir: str | Path, last_steps: int | None = None):
    """{layer: RoutingStats} summed over the run (or over the rows of the last ``last_steps`` steps)."""
    from condmoe.routing import RoutingStats

    table = read_routing(run_dir)
    rows = table.to_pylist()
    if last_steps is not None and rows:
        top = max(r["step"] for r in rows)
        rows = [r for r in rows if r["step"] > top - last_steps]
    out: dict[str, RoutingStats] = {}
    for r in rows:
        s = RoutingStats.from_dict(r)
        out[r["layer"]] = out[r["layer"]] + s if r["layer"] in out else s
    return out
