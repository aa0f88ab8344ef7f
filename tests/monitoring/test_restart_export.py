"""SIGKILL one Ray Train worker mid-run: the exporter (owned by the driver) survives the restart,
counts it, and the Parquet log still sums to the run's own routing totals.

The job runs as ``condmoe train`` in its own process group; the test scrapes the exporter URL the
driver logs, every 0.3 s, and keeps the last exposition (the driver waits for one scrape after the
final update before it stops the exporter).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from condmoe.cluster.parquet_log import routing_totals
from condmoe.trainer.checkpoint import latest_checkpoint, read_meta

from prom_server import ROOT
from worker_kill import kill_worker_after_checkpoint, rank_lines

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

CONDMOE = Path(sys.executable).parent / "condmoe"
STEPS = 12
URL = re.compile(r"Prometheus exporter for job restartjob: (http://127\.0\.0\.1:\d+/metrics)")


def _values(text: str) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.labels.get("job") == "restartjob" and "layer" not in s.labels and "le" not in s.labels}


def _scrape_forever(proc: subprocess.Popen, urls: list[str], last: dict, stop: threading.Event) -> None:
    while not stop.is_set() and proc.poll() is None:
        if urls:
            try:
                with urllib.request.urlopen(urls[0], timeout=2) as r:
                    last["text"] = r.read().decode()
            except OSError:
                pass
        time.sleep(0.3)


def test_worker_restart_is_counted_and_the_log_stays_exact(fmnist_shards, tmp_path):
    storage = tmp_path / "runs"
    run = storage / "restartjob"
    cmd = [str(CONDMOE), "train", str(ROOT / "configs/topk_moe.yaml"), "--json",
           "--set", f"data.path={fmnist_shards}", "--set", "model.size=tiny", "--set", f"optim.steps={STEPS}",
           "--set", "data.batch_size=32", "--set", "checkpoint.every=3", "--set", "metrics.log_every=1",
           "--set", "metrics.eval_batches=1", "--set", "metrics.record_keys=true",
           "--set", "cluster.max_failures=2", "--set", f"cluster.storage_path={storage}",
           "--set", "cluster.name=restartjob", "--set", "metrics.prometheus.port=0"]
    proc = subprocess.Popen(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    urls: list[str] = []
    output: list[str] = []
    last: dict = {}
    stop = threading.Event()

    def read_output() -> None:
        for line in proc.stdout:
            output.append(line)
            m = URL.search(line)
            if m and not urls:
                urls.append(m.group(1))

    reader = threading.Thread(target=read_output, daemon=True)
    scraper = threading.Thread(target=_scrape_forever, args=(proc, urls, last, stop), daemon=True)
    reader.start()
    scraper.start()
    killed = None
    try:
        deadline = time.monotonic() + 360
        killed = kill_worker_after_checkpoint(proc, run, deadline=deadline)
        assert killed is not None, "the run ended before a worker could be killed:\n" + "".join(output)[-3000:]
        proc.wait(timeout=max(30.0, deadline - time.monotonic()))
        reader.join(timeout=10)
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        scraper.join(timeout=10)
    assert proc.returncode == 0, "".join(output)[-4000:]
    assert urls, "the driver never logged the exporter URL"
    values = _values(last["text"])
    log = "".join(output)[-3000:]
    assert values["condmoe_worker_restarts_total"] == 1, log
    assert values["condmoe_train_last_step"] == STEPS, log
    # the counter holds every step rank 0 pushed: all of the last attempt's, plus what the killed
    # attempt pushed before it died (steps after its last push are lost, re-run ones count twice)
    executed = rank_lines(run, 0)
    first_pid = executed[0]["pid"]
    resumed_at = min(ln["step"] for ln in executed if ln["pid"] != first_pid) - 1
    assert STEPS - resumed_at <= values["condmoe_train_steps_total"] <= len(executed), log
    totals = read_meta(latest_checkpoint(run / "checkpoints"))["routing"]
    logged = routing_totals(run)  # the newest attempt's row for every step
    assert {n: s.load.tolist() for n, s in logged.items()} == {n: d["load"] for n, d in totals.items()}
