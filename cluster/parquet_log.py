"""The run's routing history as Parquet: one file set per run, read with ``pyarrow.dataset``.

Layout under the run directory::

    monitor/routing/part-<attempt>-<seq>.parquet   one row per (optimiser step, routed layer)
    monitor/train/part-<attempt>-<seq>.parquet     one row per report (loss, throughput, eval)

Routing rows hold each step's stats summed over all ranks (the loop sends them
as ``routing_steps`` with every report, all-reduced in one collective); a train
row covers the ``steps`` optimiser steps since the previous report (the loop
reports every ``metrics.log_every`` steps). A report without ``routing_steps``
gives one routing row per layer for its whole interval. Rows are buffered and
written as a new file at each checkpoint, every ``flush_rows`` rows and at
the end, so a crash loses at most the rows since the last checkpoint. After a
restart the resumed attempt rewrites steps the failed one had already
logged; :func:`read_routing` / :func:`read_train` keep the newest attempt's
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

log = logging.getLogger(__name__)

ROUTING_SCHEMA = pa.schema([
    ("step", pa.int64()), ("steps", pa.int64()), ("time", pa.timestamp("ms", tz="UTC")),
    ("attempt", pa.int64()), ("layer", pa.string()), ("kind", pa.string()), ("experts", pa.int32()),
    ("load", pa.list_(pa.float64())), ("samples", pa.int64()), ("dropped", pa.int64()),
    ("early_exits", pa.int64()), ("entropy", pa.float64()), ("imbalance", pa.float64()),
])
TRAIN_SCHEMA = pa.schema([
    ("step", pa.int64()), ("steps", pa.int64()), ("time", pa.timestamp("ms", tz="UTC")),
    ("attempt", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()), ("samples_per_s", pa.float64()),
    ("eval_accuracy", pa.float64()), ("eval_macs_per_sample", pa.float64()), ("eval_exit_rate", pa.float64()),
    ("checkpoint", pa.string()),
])


def monitor_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "monitor"


class ParquetLog:
    """Rank 0's writer: :meth:`add` each report's metrics dict, :meth:`flush` to a new file."""

    def __init__(self, run_dir: str | Path, *, flush_rows: int = 512) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        self.root = monitor_dir(run_dir)
        self.flush_rows = flush_rows
        self.attempt = time.time_ns()
        self._seq = 0
        self._last_step: int | None = None
        self._routing: list[dict[str, Any]] = []
        self._train: list[dict[str, Any]] = []

    def add(self, metrics: dict[str, Any], checkpoint: str | Path | None = None) -> None:
        """One report of the train loop: {"step", "loss", "routing": {layer: as_dict()}, ...}."""
        step = int(metrics["step"])
        steps = step - self._last_step if self._last_step is not None and step > self._last_step else None
        self._last_step = step
        now = time.time()
        base = {"step": step, "steps": steps, "time": int(now * 1000), "attempt": self.attempt}
        per_step = metrics.get("routing_steps")
        if per_step is None:
            per_step = [{"step": step, "steps": steps, "routing": metrics.get("routing") or {}}]
        for entry in per_step:
            row = {**base, "step": int(entry["step"]), "steps": entry.get("steps", 1)}
            for layer, d in entry["routing"].items():
                self._routing.append({**row, "layer": layer, "kind": d["kind"], "experts": len(d["load"]),
                                      "load": [float(v) for v in d["load"]], "samples": int(d["samples"]),
                                      "dropped": int(d["dropped"]), "early_exits": int(d["early_exits"]),
                                      "entropy": float(d["entropy"]), "imbalance": float(d["imbalance"])})
        self._train.append({**base, **{k: _float(metrics.get(k)) for k in (
            "loss", "lr", "samples_per_s", "eval_accuracy", "eval_macs_per_sample", "eval_exit_rate")},
            "checkpoint": str(checkpoint) if checkpoint else None})
        if checkpoint is not None or len(self._train) >= self.flush_rows:
            self.flush()

    def set_first_step(self, step: int) -> None:
        """The step before this attempt's first one (so the first row knows how many steps it covers)."""
        if self._last_step is None:
            self._last_step = int(step)

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


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


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
