"""What the train loop emits, and where it goes: typed records handed to metrics sinks.

The loop knows no output format. It builds a small frozen record at each
event and hands it to every sink of the job, on every rank:

    RestartRecord     once per attempt, before the first step (fresh start or resume)
    StepRecord        every report interval (metrics.log_every, and before eval/checkpoint)
    EvalRecord        after an evaluation over the whole eval split
    CheckpointRecord  after a checkpoint was written (path on rank 0 only)
    StopRecord        the run stopped early at a step all ranks agreed on, checkpoint written (preemption)

A sink is anything with ``write(record)`` and ``close()`` (:class:`MetricsSink`).
The loop closes the sinks it was given when the run ends, also on error. The
jsonl log (:class:`JsonlSink`, here) is the run's own history without Ray; the
Parquet routing log, the Prometheus feed and Ray Train's report are sinks of
condmoe.cluster, which chooses the sinks a job gets.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union

from condmoe.routing import RoutingStats


@dataclass(frozen=True)
class RestartRecord:
    """An attempt starts: at ``step`` (0 for a fresh run), from ``resumed_from`` (None: fresh)."""

    step: int
    world_size: int
    resumed_from: Path | None = None
    rank: int = 0
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class StepRecord:
    """The report interval that ends at ``step``; ``steps`` optimiser steps since the previous one.

    loss: the step's loss, mean over ranks. routing: the interval's per-layer
    stats summed over steps and ranks; routing_steps: (step, per-layer stats) of
    every step of the interval, summed over ranks. step_seconds: wall time of
    each step on this rank (data wait included); data_wait_seconds: this rank's
    wait for each micro-batch; bad_samples: this rank's newly skipped samples by
    reason.
    """

    step: int
    steps: int
    samples: int
    loss: float
    lr: float
    epoch: int
    samples_per_s: float
    first_step_time: float
    routing: dict[str, RoutingStats]
    routing_steps: list[tuple[int, dict[str, RoutingStats]]]
    step_seconds: list[float] = field(default_factory=list)
    data_wait_seconds: list[float] = field(default_factory=list)
    bad_samples: dict[str, int] = field(default_factory=dict)
    rank: int = 0
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class EvalRecord:
    """An evaluation at ``step`` over ``samples`` images (the whole split unless capped)."""

    step: int
    accuracy: float
    samples: int
    macs_per_sample: float
    exit_rate: float
    rank: int = 0
    ema: bool = False  # evaluated with the weights' moving average (optim.ema), not the live weights

    def as_metrics(self) -> dict[str, float]:
        """The ``eval_*`` keys the CLI, Ray Train and TrainResult use."""
        return {"eval_accuracy": self.accuracy, "eval_samples": self.samples,
                "eval_macs_per_sample": self.macs_per_sample, "eval_exit_rate": self.exit_rate}


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint of ``step``: ``path`` on rank 0 (None elsewhere); ``seconds`` to write it
    (0 when an existing checkpoint is handed on, e.g. a finished run started again)."""

    step: int
    path: Path | None
    seconds: float
    rank: int = 0


@dataclass(frozen=True)
class StopRecord:
    """The run stopped early after ``step`` with a checkpoint there (condmoe.trainer.stop).

    reason: "preempt" (SIGTERM to a worker or a node-drain notice: the job restarts from that
    checkpoint) or "stop" (condmoe train itself was stopped: SIGTERM or Ctrl-C). ``checkpoint`` on
    rank 0 (None elsewhere); ``seconds`` to write it (0 when the step's periodic checkpoint was
    already written).
    """

    step: int
    reason: str
    checkpoint: Path | None
    seconds: float
    rank: int = 0
    time: float = field(default_factory=time.time)


Record = Union[RestartRecord, StepRecord, EvalRecord, CheckpointRecord, StopRecord]


class MetricsSink(Protocol):
    """Where records go. ``write`` is called on every rank for every record, in order."""

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Rank 0's ``<run dir>/metrics.jsonl``: one JSON line per record, ``"kind"`` naming its type.

    step lines carry the interval's routing totals as ``RoutingStats.as_dict()``
    per layer (per-step rows are the Parquet log's); other ranks write nothing.
    """

    KINDS = {RestartRecord: "restart", StepRecord: "step", EvalRecord: "eval", CheckpointRecord: "checkpoint",
             StopRecord: "stop"}

    def __init__(self, path: str | Path, rank: int = 0) -> None:
        self.path, self.rank = Path(path), rank
        self._file = None

    def write(self, record: Record) -> None:
        if self.rank != 0:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        line: dict = {"kind": self.KINDS[type(record)]}
        for name, value in vars(record).items():
            if name in ("routing_steps", "step_seconds", "data_wait_seconds", "rank"):
                continue
            if name == "routing":
                value = {n: s.as_dict() for n, s in value.items()}
            elif isinstance(value, Path):
                value = str(value)
            line[name] = value
        if isinstance(record, EvalRecord):
            line.update(record.as_metrics())
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (only those of ``kind`` when given)."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return [x for x in lines if kind is None or x.get("kind") == kind]
