"""A real Ray cluster: `ray start --head` on 127.0.0.1 with token auth, condmoe submit/status/logs/list/stop.

The cluster is started in its own process group with its own temp dir (so no
other Ray on this machine can attach to it) and that group is killed at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from condmoe.cluster.cli import main
from condmoe.trainer.engine import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard URL, token) of a token-auth head node; torn down by process group."""
    token = secrets.token_hex(16)
    tmp = tempfile.mkdtemp(prefix="cmray", dir="/tmp")  # short: unix socket paths are limited
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "DS_ACCELERATOR": "cpu",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}",  # the default 52365 may be another Ray's
         "--num-cpus=4", f"--temp-dir={tmp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pgid = proc.pid
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        yield f"http://127.0.0.1:{dash}", token
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        shutil.rmtree(tmp, ignore_errors=True)


def test_submit_status_logs_list(ray_head, fmnist_shards, tmp_path, monkeypatch, capsys):
    url, token = ray_head
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    # without the token the cluster refuses: one clear line, non-zero
    assert main(["list", "--address", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused" in err and "\n" not in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    job = Path(__file__).resolve().parents[2] / "configs" / "topk_moe.yaml"
    rc = main(["submit", str(job), "--address", url, "--id", "condmoe-t1", "--wait", "--timeout", "400",
               "--set", f"data.path={fmnist_shards}", "--set", "model.size=tiny", "--set", "optim.steps=4",
               "--set", "data.batch_size=32", "--set", "checkpoint.every=2", "--set", "metrics.eval_batches=1",
               "--set", f"cluster.storage_path={tmp_path / 'runs'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "condmoe-t1: SUCCEEDED" in out
    assert main(["status", "condmoe-t1", "--address", url]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", "condmoe-t1", "--address", url]) == 0
    logs = capsys.readouterr().out
    assert "accuracy:" in logs and "checkpoint:" in logs
    assert main(["list", "--address", url]) == 0
    assert "condmoe-t1" in capsys.readouterr().out
    assert (tmp_path / "runs" / "topk_moe" / "checkpoints" / "step-00000004" / "meta.json").is_file()
    assert main(["stop", "condmoe-t1", "--address", url]) == 0
    assert "already finished" in capsys.readouterr().out
