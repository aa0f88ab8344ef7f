"""A real Prometheus server for tests: temp config + storage, 127.0.0.1 only, bounded waits."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from condmoe.trainer.engine import free_port

# shared by the monitoring tests (imported by name from here, never from ``conftest``:
# several test folders have a conftest.py and a plain ``import conftest`` picks any of them)
ROOT = Path(__file__).resolve().parents[2]
JOB_STEPS = 8
LOCAL_STEPS = 6


class PrometheusServer:
    """/usr/bin/prometheus scraping ``targets`` with ``honor_labels`` (the exporter's job label wins)."""

    def __init__(self, binary: str, workdir: Path, targets: list[str], port: int, interval: str) -> None:
        for t in targets:
            if not t.startswith("127.0.0.1:"):
                raise ValueError(f"test Prometheus scrapes 127.0.0.1 only, got target {t!r}")
        self.binary, self.workdir, self.port = binary, Path(workdir), port
        self.config = {"global": {"scrape_interval": interval, "scrape_timeout": interval,
                                  "evaluation_interval": "10s"},
                       "scrape_configs": [{"job_name": "condmoe", "honor_labels": True,
                                           "static_configs": [{"targets": list(targets)}]}]}
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config))
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s: {self.tail()}")

    def tail(self) -> str:
        p = self.workdir / "prometheus.log"
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""

    def query(self, promql: str) -> list[dict]:
        """Instant query over the HTTP API; returns the result vector."""
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, predicate, timeout: float = 30.0) -> list[dict]:
        """Poll ``promql`` until ``predicate(result)`` holds (bounded)."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{promql!r} never satisfied the condition in {timeout}s; last: {result}")

    def targets_up(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            return json.loads(r.read())["data"]["activeTargets"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
