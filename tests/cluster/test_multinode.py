"""Node loss on a real multi-node Ray cluster on one host (condmoe.cluster.local_cluster).

A head and a second node (each its own ``ray start`` with its own ports, process group and
the shared temp dir, torn down at the end) each offer one ``trainer`` resource, so the 2-worker
job (``cluster.resources_per_worker: {trainer: 1}``) puts one worker on each node:

(a) fixed 2 workers, node 2 killed, node 2 restarted: the job resumes and finishes, every sample
    of the interrupted epoch read exactly once;
(b) elastic [1, 2], node 2 killed: the job carries on with 1 worker from the newest checkpoint
    (exactly once), node 2 restarted: it grows back to 2 (Prometheus counts the resizes);
(c) SIGTERM to a worker: a checkpoint at the next step, the group restarts there, no lost step;
(d) Ray drains node 2 for preemption (``ray drain-node``, what a spot reclaim does): the same, and the
    elastic job carries on without the draining node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from condmoe.cluster.jobs import parse_attempts
from condmoe.cluster.local_cluster import LocalCluster
from condmoe.datasets import StreamingLoader
from condmoe.trainer.checkpoint import latest_checkpoint, read_meta
from condmoe.trainer.records import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONDMOE = Path(sys.executable).parent / "condmoe"
JOB = Path(__file__).resolve().parents[2] / "configs" / "topk_moe.yaml"
BATCH = 64
# node death seen in ~2 s instead of ~15 (the GCS pings each raylet)
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "2",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_initial_delay_ms": "1000"}


@pytest.fixture(scope="module")
def two_nodes():
    with LocalCluster(cpus_per_node=2, env=FAST_HEALTH) as cl:
        cl.start_head({"trainer": 1})
        cl.add_node("node2", {"trainer": 1})
        try:
            yield cl
        except BaseException:
            print(cl.logs())
            raise


def _ensure_node2(cl: LocalCluster) -> None:
    if not cl.nodes["node2"].alive:
        cl.add_node("node2", {"trainer": 1})


class Job:
    """``condmoe train`` on the cluster as a subprocess (its output in a file), plus its run directory."""

    def __init__(self, cl: LocalCluster, tmp: Path, shards, name: str, *overrides: str,
                 env: dict | None = None) -> None:
        self.run = tmp / "runs" / name
        self.out = tmp / f"{name}.out"
        cmd = [str(CONDMOE), "train", str(JOB), "--address", cl.address, "--set", f"data.path={shards}",
               "--set", "model.size=tiny", "--set", f"data.batch_size={BATCH}", "--set", "metrics.log_every=1",
               "--set", "metrics.eval_batches=1", "--set", "metrics.record_keys=true",
               "--set", "metrics.prometheus.port=0", "--set", f"cluster.storage_path={tmp / 'runs'}",
               "--set", f"cluster.name={name}", "--set", "cluster.resources_per_worker={trainer: 1}",
               "--set", "cluster.start_timeout_s=15", "--set", "cluster.max_failures=4",
               "--set", "optim.warmup_steps=2", *[a for o in overrides for a in ("--set", o)]]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", **cl.client_env, **(env or {})}
        env.pop("RAY_ADDRESS", None)
        with open(self.out, "w") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def lines(self) -> list[dict]:
        return [{**json.loads(x), "file": f.name} for f in sorted((self.run / "keys").glob("rank*.jsonl"))
                for x in f.read_text().splitlines() if x.strip()] if (self.run / "keys").is_dir() else []

    def wait(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended while waiting for {what}: {self.text()[-4000:]}")
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}: {self.text()[-4000:]}")

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restarts(self) -> list[dict]:
        return read_jsonl(self.run / "metrics.jsonl", "restart")

    def checkpoint_step(self) -> int:
        ck = latest_checkpoint(self.run / "checkpoints")
        return read_meta(ck)["step"] if ck is not None else 0


def final_view(lines: list[dict]) -> dict[int, list[tuple[int, str]]]:
    """step -> (epoch, key) of what the LAST attempt that trained the step read for it (all its ranks and
    micro-steps).

    The latest line of a step names that attempt's world size W; in each of rank0..rank{W-1}'s logs
    the step's latest process is that attempt's (a later attempt of the step would be later still)."""
    by_step: dict[int, list[dict]] = {}
    for ln in lines:
        by_step.setdefault(ln["step"], []).append(ln)
    out = {}
    for step, lns in by_step.items():
        world = max(lns, key=lambda x: x["time"])["world"]
        keys = []
        for rank in range(world):
            mine = [x for x in lns if x["file"] == f"rank{rank}.jsonl"]
            pid = max(mine, key=lambda x: x["time"])["pid"]
            keys += [(x["epoch"], k) for x in mine if x["pid"] == pid for k in x["keys"]]
        out[step] = keys
    return out


def _exactly_once(view: dict[int, list[tuple[int, str]]], steps: int) -> None:
    """Steps 1..steps each read one global batch, and within each epoch (the reader's own label: a
    resize may end it at another step) no sample twice."""
    assert sorted(view) == list(range(1, steps + 1))
    assert all(len(k) == BATCH for k in view.values()), {s: len(k) for s, k in view.items() if len(k) != BATCH}
    keys = [ek for s in view for ek in view[s]]
    assert len(keys) == len(set(keys)), [k for k, c in Counter(keys).items() if c > 1][:5]


def _epoch_steps(shards) -> int:
    return len(StreamingLoader(shards, "train", BATCH))


def test_a_fixed_job_waits_for_the_node(two_nodes, fmnist_shards, tmp_path):
    cl = two_nodes
    _ensure_node2(cl)
    steps = _epoch_steps(fmnist_shards)
    job = Job(cl, tmp_path, fmnist_shards, "fixed", "cluster.workers=2", f"optim.steps={steps}",
              "checkpoint.every=2")
    try:
        job.wait(lambda: job.checkpoint_step() >= 2 and max((x["step"] for x in job.lines()), default=0) >= 3,
                 400, "step 3 after a checkpoint")
        cl.kill_node("node2")
        killed_at = max(x["step"] for x in job.lines())
        time.sleep(10)  # the job waits: no second `trainer` resource
        assert len({x["pid"] for x in job.lines()}) == 2, "a worker group started without node 2"
        cl.add_node("node2", {"trainer": 1})
        assert job.finish(400) == 0, job.text()[-4000:]
    finally:
        job.kill()
    restarts = job.restarts()
    assert [r["world_size"] for r in restarts] == [2, 2] and 2 <= restarts[1]["step"] <= killed_at
    view = final_view(job.lines())
    _exactly_once(view, steps)  # one epoch: every sample of it once
    assert {e for ks in view.values() for e, _ in ks} == {0}
    assert job.checkpoint_step() == steps


def _scrape(text: str) -> dict[str, float]:
    url = re.search(r"Prometheus exporter for job \S+: (http://\S+/metrics)", text)
    assert url, "no exporter URL in the driver's log"
    body = urllib.request.urlopen(url.group(1), timeout=10).read().decode()
    out = {}
    for line in body.splitlines():
        m = re.match(r"(condmoe_(?:train_world_size|train_resizes_total|preemption_checkpoints_total))"
                     r"\{([^}]*)\} ([0-9.e+-]+)", line)
        if m:
            reason = re.search(r'reason="(\w+)"', m.group(2))
            out[m.group(1) + (f":{reason.group(1)}" if reason else "")] = float(m.group(3))
    return out


def test_b_elastic_job_shrinks_and_grows(two_nodes, fmnist_shards, tmp_path):
    cl = two_nodes
    _ensure_node2(cl)
    job = Job(cl, tmp_path, fmnist_shards, "elastic", "cluster.workers=[1, 2]", "optim.steps=400",
              "checkpoint.every=2", "cluster.resize_interval_s=5")
    try:
        job.wait(lambda: job.checkpoint_step() >= 2 and max((x["step"] for x in job.lines()), default=0) >= 3,
                 400, "step 3 after a checkpoint")
        t_kill = cl.kill_node("node2")
        one = job.wait(lambda: [x for x in job.lines() if x["world"] == 1], 300, "a step on 1 worker")
        assert one[0]["time"] > t_kill
        cl.add_node("node2", {"trainer": 1})
        t_back = time.time()
        job.wait(lambda: [x for x in job.lines() if x["world"] == 2 and x["time"] > t_back and x["step"] >= 2 + min(
            y["step"] for y in job.lines() if y["world"] == 2 and y["time"] > t_back)], 300, "2 steps on 2 workers again")
        metrics = _scrape(job.text())
        job.proc.send_signal(signal.SIGTERM)  # the test has what it needs: stop with a checkpoint
        assert job.finish(200) == 128 + signal.SIGTERM, job.text()[-4000:]
    finally:
        job.kill()
    assert metrics["condmoe_train_world_size"] == 2 and metrics["condmoe_train_resizes_total"] == 2, metrics
    history = parse_attempts(job.text())  # what `condmoe status` reads from a submitted job's logs
    assert history["workers"] == 2 and (history["last_resize"]["from"], history["last_resize"]["to"]) == (1, 2)
    worlds = [r["world_size"] for r in job.restarts()]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    first_one = next(r for r in job.restarts() if r["world_size"] == 1)
    assert first_one["step"] >= 2 and first_one["resumed_from"]  # from the newest checkpoint
    ckpt = latest_checkpoint(job.run / "checkpoints")
    stop = read_jsonl(job.run / "metrics.jsonl", "stop")
    assert [s["reason"] for s in stop] == ["stop"] and read_meta(ckpt)["step"] == stop[0]["step"]
    _exactly_once(final_view(job.lines()), stop[0]["step"])
    # the 1-worker attempt read the global batch as 2 micro-batches of 32 (grad_accum 2)
    solo = [x for x in job.lines() if x["world"] == 1]
    assert {len(x["keys"]) for x in solo} == {BATCH // 2}
    assert Counter((x["pid"], x["step"]) for x in solo).most_common(1)[0][1] == 2


def test_c_sigterm_to_a_worker_checkpoints_next_step(two_nodes, fmnist_shards, tmp_path):
    cl = two_nodes
    _ensure_node2(cl)
    steps = _epoch_steps(fmnist_shards)
    job = Job(cl, tmp_path, fmnist_shards, "preempt", "cluster.workers=2", f"optim.steps={steps}",
              "checkpoint.every=0")
    try:
        line = job.wait(lambda: next((x for x in job.lines() if x["step"] >= 3 and x["file"] == "rank1.jsonl"),
                                     None), 400, "step 3 on rank 1")
        os.kill(line["pid"], signal.SIGTERM)
        assert job.finish(400) == 0, job.text()[-4000:]
    finally:
        job.kill()
    stop = read_jsonl(job.run / "metrics.jsonl", "stop")
    assert [s["reason"] for s in stop] == ["preempt"], stop
    step = stop[0]["step"]
    assert 3 <= step < steps and stop[0]["checkpoint"].endswith(f"step-{step:08d}")
    restarts = job.restarts()
    assert [r["step"] for r in restarts] == [0, step]  # the new group started at the preemption checkpoint
    lines = job.lines()
    first = {x["pid"] for x in lines if x["step"] == 1}
    assert max(x["step"] for x in lines if x["pid"] in first) == step  # the first group trained up to it
    assert min(x["step"] for x in lines if x["pid"] not in first) == step + 1  # no step lost or redone
    _exactly_once(final_view(lines), steps)
    assert Counter((x["file"], x["step"]) for x in lines).most_common(1)[0][1] == 1


def test_d_drain_notice_checkpoints_next_step(two_nodes, fmnist_shards, tmp_path):
    cl = two_nodes
    _ensure_node2(cl)
    job = Job(cl, tmp_path, fmnist_shards, "drain", "cluster.workers=[1, 2]", "optim.steps=400",
              "checkpoint.every=0", env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"})  # the controller's
    try:
        job.wait(lambda: max((x["step"] for x in job.lines()), default=0) >= 3, 400, "step 3")
        cl.drain_node("node2", deadline_s=120)
        job.wait(lambda: read_jsonl(job.run / "metrics.jsonl", "stop"), 200, "the preemption checkpoint")
        first = {x["pid"] for x in job.lines() if x["step"] == 1}
        job.wait(lambda: [x for x in job.lines() if x["pid"] not in first], 300, "a step of the next group")
        job.proc.send_signal(signal.SIGTERM)
        assert job.finish(200) == 128 + signal.SIGTERM, job.text()[-4000:]
    finally:
        job.kill()
        cl.kill_node("node2")  # the preemption itself; the next test starts it again
    stops = read_jsonl(job.run / "metrics.jsonl", "stop")
    assert stops[0]["reason"] == "preempt", stops
    step = stops[0]["step"]
    restarts = job.restarts()
    assert restarts[1]["step"] == step and restarts[1]["world_size"] == 1, restarts  # not on the draining node
    lines = job.lines()
    assert max(x["step"] for x in lines if x["pid"] in first) == step
    assert min(x["step"] for x in lines if x["pid"] not in first) == step + 1  # no step lost or redone
    _exactly_once(final_view(lines), stops[-1]["step"])
