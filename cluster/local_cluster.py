"""A Ray cluster of several nodes on one host, for tests and benchmarks of node loss.

Each node is one ``ray start --block`` in its own session (process group) with
its own ports, all nodes under one temp dir, so killing a node (SIGKILL to its
group: raylet, agents and the workers it started) is what losing a machine looks
like to the rest of the cluster, and no other Ray on the host is touched.
Nodes carry custom resources (e.g. ``{"trainer": 1}``) so a job can place one
worker per node (``cluster.resources_per_worker``). :meth:`LocalCluster.shutdown`
(also on leaving the ``with`` block) kills every group it started.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from condmoe.trainer.engine import free_port

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log_path: Path
    resources: dict = field(default_factory=dict)
    node_manager_port: int = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """Head plus worker nodes on 127.0.0.1; ``address`` is the GCS address (``ray.init`` / ``--address``).

    env: extra environment of every node (e.g. faster health checks: ``RAY_health_check_period_ms``).
    dashboard: start the head's dashboard (the Jobs API of ``condmoe submit``); its URL is ``dashboard_url``.
    The cluster uses token authentication with a fresh token; :attr:`client_env` is what a driver
    (``condmoe train --address``) or a Jobs API client needs in its environment to connect.
    """

    def __init__(self, *, cpus_per_node: int = 2, env: dict[str, str] | None = None,
                 dashboard: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="cmlc", dir="/tmp"))  # short: unix socket paths are limited
        self.cpus, self.dashboard = cpus_per_node, dashboard
        self.token = secrets.token_hex(16)
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                    **self.client_env, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.dashboard_port = free_port() if dashboard else None
        self.nodes: dict[str, Node] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str | None:
        return f"http://127.0.0.1:{self.dashboard_port}" if self.dashboard_port else None

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start_head(self, resources: dict | None = None, timeout: float = 180.0) -> Node:
        args = ["--head", f"--port={self.port}"]
        if self.dashboard:
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false", f"--dashboard-port={free_port()}"]  # 8265 may be taken
        return self._start("head", args, resources or {}, timeout)

    def add_node(self, name: str, resources: dict | None = None, timeout: float = 180.0) -> Node:
        """Start (or restart) node ``name``; returns once the cluster lists it alive."""
        return self._start(name, [f"--address={self.address}"], resources or {}, timeout)

    def _start(self, name: str, role: list[str], resources: dict, timeout: float, tries: int = 5) -> Node:
        old = self.nodes.get(name)
        if old is not None and old.alive:
            raise RuntimeError(f"node {name} is already running")
        for attempt in range(1, tries + 1):
            try:
                return self._start_once(name, role, resources, timeout)
            except RuntimeError as exc:
                # `ray start` gives a node 30 s to register with the GCS: too short on a busy machine
                if attempt == tries or "timed out during startup" not in str(exc):
                    raise
                log.warning("node %s: %s; starting it again", name, str(exc).splitlines()[-1])
                _killpg(self.nodes[name].proc.pid, signal.SIGKILL)
        raise AssertionError("unreachable")

    def _start_once(self, name: str, role: list[str], resources: dict, timeout: float) -> Node:
        log_path = self.tmp / f"{name}-{int(time.time() * 1000)}.log"
        ports = {flag: free_port() for flag in ("node-manager-port", "object-manager-port",
                                                "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "runtime-env-agent-port", "metrics-export-port")}
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
               f"--resources={json.dumps(resources)}", f"--temp-dir={self.tmp}", "--disable-usage-stats",
               "--min-worker-port=0", "--max-worker-port=0", *(f"--{k}={v}" for k, v in ports.items()), *role]
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = self.nodes[name] = Node(name, proc, log_path, resources, ports["node-manager-port"])
        self._wait_alive(node, timeout)
        return node

    def _wait_alive(self, node: Node, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive:
                raise RuntimeError(f"node {node.name} exited: {node.log_path.read_text()[-3000:]}")
            if "Ray runtime started" in node.log_path.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"node {node.name} did not start in {timeout:.0f} s: {node.log_path.read_text()[-3000:]}")

    def kill_node(self, name: str) -> float:
        """SIGKILL everything of node ``name`` at once: its process group (raylet, agents) and every
        process the raylet started (Ray puts each worker in a group of its own). Returns the time."""
        node = self.nodes[name]
        procs = _tree(node.proc.pid)
        t = time.time()
        _killpg(node.proc.pid, signal.SIGKILL)
        for proc in procs:
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        node.proc.wait()
        return t

    def node_id(self, name: str) -> str:
        """Ray's id (hex) of the live node ``name`` (found by its node-manager port)."""
        code = ("import json, ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
                "print(json.dumps([[n['NodeID'], n['NodeManagerPort']] for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env, capture_output=True,
                             text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"listing the nodes failed: {out.stderr[-2000:]}")
        port = self.nodes[name].node_manager_port
        ids = [nid for nid, p in json.loads(out.stdout.strip().splitlines()[-1]) if p == port]
        if not ids:
            raise RuntimeError(f"node {name} (node-manager port {port}) is not alive")
        return ids[0]

    def drain_node(self, name: str, deadline_s: int = 60) -> None:
        """Ask the GCS to drain node ``name`` for preemption (what a spot reclaim or a Kubernetes drain does
        through Ray's autoscaler), with ``deadline_s`` seconds until it goes; the node keeps running."""
        cmd = [str(BIN / "ray"), "drain-node", f"--address={self.address}", f"--node-id={self.node_id(name)}",
               "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=condmoe test preemption",
               f"--deadline-remaining-seconds={deadline_s}"]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"ray drain-node failed: {out.stdout[-1000:]}{out.stderr[-2000:]}")

    def shutdown(self) -> None:
        """Kill every node (workers first, the head last) and remove the temp dir."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            node = self.nodes[name]
            procs = _tree(node.proc.pid)  # workers are in groups of their own
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not _killpg(node.proc.pid, sig):
                    break
                time.sleep(1.0 if sig == signal.SIGTERM else 0)
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("node %s did not exit", name)
            for proc in procs:
                try:
                    proc.kill()
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.nodes.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def logs(self) -> str:
        """The tail of every node's ``ray start`` output (for a failing test's message)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.tmp.glob("*.log")))


def _tree(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
