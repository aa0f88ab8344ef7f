"""Preemption: SIGTERM makes every rank checkpoint at the same next step and stop; the restart loses
no step; a checkpoint that misses the grace period is never chosen; SIGTERM to ``condmoe train``
stops the job with a checkpoint and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from condmoe.trainer.checkpoint import latest_checkpoint, read_meta
from condmoe.trainer.engine import free_port
from condmoe.trainer.stop import EXIT_GRACE, PREEMPT, STOP, SignalStop, agree

WORKER = Path(__file__).resolve().parent / "_stop_worker.py"
CONDMOE = Path(sys.executable).parent / "condmoe"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from trainer_testlib import rank_env, tiny_job  # noqa: E402


def test_signal_stop_handler():
    """First SIGTERM: a stop request; the second: the previous handler; no done() in time: on_expire."""
    calls, expired = [], threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        stop = SignalStop(0.3, on_expire=expired.set).install()
        assert stop.poll() == 0 and agree(STOP) == STOP  # a world of one agrees with itself
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.poll() == PREEMPT and stop.why == "SIGTERM" and calls == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert calls == [signal.SIGTERM]  # the second signal is the previous handler's
        assert expired.wait(5)
        stop.request(STOP, "driver")  # another source may raise the reason; the deadline stays
        assert stop.poll() == STOP
        stop.uninstall()
        assert signal.getsignal(signal.SIGTERM) is not stop
        quick = SignalStop(0.2, on_expire=lambda: calls.append("expired"))
        quick.request(PREEMPT, "drain")
        quick.done()
        time.sleep(0.4)
        assert calls == [signal.SIGTERM]  # done() in time: nothing expires
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_driver_ctrl_c_asks_the_workers_once_then_gives_up(monkeypatch):
    """condmoe train's side without Ray: the first Ctrl-C asks the workers to stop (and the fit's
    result still comes back); a second one stops waiting for workers that do not return."""
    from condmoe.cluster import preempt

    requests = []
    monkeypatch.setattr(preempt, "request_stop", requests.append)
    before = signal.getsignal(signal.SIGINT)

    def fit():  # returns once the workers were asked to stop
        while not requests:
            time.sleep(0.01)
        return "result"

    with preempt.DriverSignals() as signals:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        out = preempt.wait_for_fit(fit, signals, "stop/job/1", grace_s=30)
    assert (out.result, out.signal, out.abandoned, requests) == ("result", "SIGINT", False, ["stop/job/1"])
    assert signal.getsignal(signal.SIGINT) is before  # given back

    hung = threading.Event()
    with preempt.DriverSignals() as signals:
        for delay in (0.2, 0.6):
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        out = preempt.wait_for_fit(hung.wait, signals, "stop/job/2", grace_s=30)
    hung.set()
    assert out.abandoned and out.signal == "SIGTERM" and out.result is None and time.monotonic() - t0 < 10


def _job(tmp_path: Path, shards, name: str, *, steps: int, every: int) -> Path:
    tree = tiny_job(shards, steps=steps, every=every)
    tree["metrics"].update(record_keys=True, log_every=5)
    tree["cluster"] = {"storage_path": str(tmp_path / "runs"), "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _start(job: Path, out: Path, world: int, **env) -> list[subprocess.Popen]:
    """``world`` processes of _stop_worker.py (one alone picks its own port when it initialises)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        base = rank_env(rank, world, port) if world > 1 else \
            {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        e = {**base, **{k: str(v) for k, v in env.items()}}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(job), str(out)], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            log, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, log))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _key_lines(run: Path) -> list[dict]:
    return [{**json.loads(x), "file": f.name} for f in sorted((run / "keys").glob("rank*.jsonl"))
            for x in f.read_text().splitlines() if x.strip()]


def _wait_for_step(run: Path, step: int, procs, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a worker ended early: {_finish(procs)[0][1][-3000:]}")
        if any(ln["step"] >= step for ln in _key_lines(run)) if (run / "keys").is_dir() else False:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_next_step(tmp_path, fmnist_shards):
    """2 ranks (gloo); SIGTERM to rank 1 only: both stop after the same step with one checkpoint
    there (no periodic ones: checkpoint.every 0); the run started again continues at the next step
    and every step is trained exactly once."""
    job = _job(tmp_path, fmnist_shards, "pre", steps=30, every=0)
    run = tmp_path / "runs" / "pre"
    procs = _start(job, tmp_path / "first", 2)
    _wait_for_step(run, 3, procs)
    procs[1].send_signal(signal.SIGTERM)
    for rc, log in _finish(procs):
        assert rc == 0, log[-3000:]
    res = [json.loads((tmp_path / f"first-{r}.json").read_text()) for r in (0, 1)]
    step = res[0]["step"]
    assert [r["stopped"] for r in res] == ["preempt", "preempt"] and res[1]["step"] == step < 30
    ckpt = latest_checkpoint(run / "checkpoints")
    assert read_meta(ckpt)["step"] == step and str(ckpt) == res[0]["checkpoint"]
    assert max(ln["step"] for ln in _key_lines(run)) == step  # nothing trained past the checkpoint
    stops = [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if x["kind"] == "stop"]
    assert [(x["step"], x["reason"]) for x in stops] == [(step, "preempt")]
    for rc, log in _finish(_start(job, tmp_path / "second", 2)):
        assert rc == 0, log[-3000:]
    again = json.loads((tmp_path / "second-0.json").read_text())
    assert again["step"] == 30 and again["stopped"] is None and again["resumed_from"] == str(ckpt)
    assert min(int(s) for s in again["losses"]) == step + 1  # resumed right after it
    per_step = Counter((ln["file"], ln["step"]) for ln in _key_lines(run))
    assert sorted({s for _, s in per_step}) == list(range(1, 31)) and set(per_step.values()) == {1}
    keys = [(ln["epoch"], k) for ln in _key_lines(run) for k in ln["keys"]]
    assert len(keys) == len(set(keys)) == 30 * 32  # within each epoch every sample at most once


@pytest.mark.slow
def test_checkpoint_past_grace_is_never_chosen(tmp_path, fmnist_shards):
    """The stop checkpoint takes longer than the grace period: the process exits (EXIT_GRACE) before
    committing it, and the newest committed (periodic) checkpoint stays the latest."""
    job = _job(tmp_path, fmnist_shards, "slow", steps=60, every=2)
    run = tmp_path / "runs" / "slow"
    procs = _start(job, tmp_path / "slow", 1, CONDMOE_TEST_GRACE=2, CONDMOE_TEST_SLOW_SAVE=20)
    _wait_for_step(run, 3, procs)
    procs[0].send_signal(signal.SIGTERM)
    [(rc, log)] = _finish(procs, timeout=120)
    assert rc == EXIT_GRACE, log[-3000:]
    assert "no checkpoint committed within 2 s" in log
    last_trained = max(ln["step"] for ln in _key_lines(run))
    latest = read_meta(latest_checkpoint(run / "checkpoints"))["step"]
    assert latest % 2 == 0 and latest < last_trained, (latest, last_trained)
    assert any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())  # the one cut short


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_to_condmoe_train_stops_cleanly(tmp_path, fmnist_shards):
    """SIGTERM to ``condmoe train`` (what ``timeout`` or a batch scheduler sends) at some step of a
    run that checkpoints only at its end: the workers checkpoint at the next step and stop, the
    driver exits 143, and no process of the embedded Ray (raylet, GCS, dashboard, controller,
    exporter, workers) is left."""
    job = _job(tmp_path, fmnist_shards, "term", steps=400, every=0)
    run = tmp_path / "runs" / "term"
    cmd = [str(CONDMOE), "train", str(job), "--set", "model.name=topk_moe_cnn", "--set", "model.size=tiny",
           "--set", "cluster.workers=2", "--set", "metrics.prometheus.port=0"]
    proc = subprocess.Popen(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_step(run, 3, [proc], timeout=400)
        spawned = _descendants(proc.pid)
        assert len(spawned) >= 4, spawned  # raylet, gcs, workers, ...
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None, out[-4000:]
    step = read_meta(ckpt)["step"]
    assert 3 <= step < 400 and max(ln["step"] for ln in _key_lines(run)) == step
    assert f"stopped by SIGTERM after step {step}" in out
    time.sleep(1.0)
    assert _alive(spawned) == [], "left behind"
