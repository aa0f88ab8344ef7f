"""Operators see elastic resizes and preemption checkpoints: the Prometheus families, the sink's
updates, and ``condmoe status``'s worker count and last resize (read from the job's logs)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from condmoe.cluster.cli import main
from condmoe.cluster.jobs import parse_attempts
from condmoe.cluster.metrics import JobMetrics
from condmoe.cluster.sinks import AttemptLogSink, PrometheusSink
from condmoe.trainer.config import job_from_dict
from condmoe.trainer.records import RestartRecord, StopRecord


def _values(m: JobMetrics) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(m.exposition()):
        for s in fam.samples:
            if s.name in ("condmoe_train_world_size", "condmoe_train_resizes_total",
                          "condmoe_preemption_checkpoints_total"):
                out[s.name + (f":{s.labels['reason']}" if "reason" in s.labels else "")] = s.value
    return out


def test_world_size_resizes_and_stop_checkpoints():
    m = JobMetrics("el")
    assert _values(m) == {"condmoe_train_world_size": 0, "condmoe_train_resizes_total": 0,
                          "condmoe_preemption_checkpoints_total:preempt": 0,
                          "condmoe_preemption_checkpoints_total:stop": 0}
    for world in (2, 2, 1, 2):  # a restart at the same size is not a resize
        m.apply({"world_size": world})
    m.apply({"stops": ["preempt"]})
    m.apply({"stops": ["preempt"]})
    m.apply({"stops": ["stop"]})
    assert _values(m) == {"condmoe_train_world_size": 2, "condmoe_train_resizes_total": 2,
                          "condmoe_preemption_checkpoints_total:preempt": 2,
                          "condmoe_preemption_checkpoints_total:stop": 1}


def test_sink_sends_world_size_and_stops(tmp_path):
    cfg = job_from_dict({"model": {"name": "topk_moe_cnn", "size": "tiny"}, "data": {"path": str(tmp_path)}})
    pushed = []
    sink = PrometheusSink(cfg, 0, lambda u, wait: pushed.append((u, wait)))
    sink.write(RestartRecord(6, 1, Path("/ck/step-6")))
    sink.write(StopRecord(9, "preempt", Path("/ck/step-9"), 0.5))
    assert pushed[0][0]["world_size"] == 1 and pushed[1] == ({**pushed[1][0], "stops": ["preempt"]}, True)
    other = []
    PrometheusSink(cfg, 1, lambda u, wait: other.append(u)).write(RestartRecord(6, 1))
    assert other == []  # rank 0 speaks for the group


def test_status_shows_workers_and_last_resize(monkeypatch, capsys, caplog):
    import logging

    from condmoe.cluster import jobs

    caplog.set_level(logging.INFO, logger="condmoe.cluster.sinks")
    sink = AttemptLogSink(0)
    for step, world, t in ((0, 2, 1000.0), (6, 1, 1100.0), (6, 1, 1150.0), (8, 2, 1200.0)):
        sink.write(RestartRecord(step, world, None, time=t))
    AttemptLogSink(1).write(RestartRecord(0, 2))  # not rank 0: nothing
    logs = "\n".join(f"(RayTrainWorker pid=7) {r.getMessage()}" for r in caplog.records)
    assert logs.count("condmoe attempt:") == 4
    assert parse_attempts(logs + "\n" + logs) == {  # lines forwarded twice count once
        "workers": 2, "attempts": 4, "last_resize": {"from": 1, "to": 2, "step": 8, "time": 1200.0}}
    assert parse_attempts("no attempts yet") == {"workers": None, "attempts": 0, "last_resize": None}

    monkeypatch.setattr(jobs, "status", lambda job_id, **kw: {"job_id": job_id, "status": "RUNNING",
                                                               "message": ""})
    monkeypatch.setattr(jobs, "worker_history", lambda job_id, **kw: parse_attempts(logs))
    assert main(["status", "j1", "--address", "http://127.0.0.1:1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "j1: RUNNING"
    assert out[1].startswith("workers: 2 (last resize 1 -> 2 at step 8, ")
    assert main(["status", "j1", "--json", "--address", "http://127.0.0.1:1"]) == 0
    import json

    st = json.loads(capsys.readouterr().out)
    assert st["workers"] == 2 and st["last_resize"]["from"] == 1 and st["attempts"] == 4
