"""Where a job's exporter runs: a Ray actor on the head node, or a child process of rank 0.

:func:`start_job_exporter` (called by the job's driver, cluster/launch.py)
starts one :class:`condmoe.cluster.metrics.MetricsExporter` per job in a named
Ray actor pinned to the head node; it outlives worker-group restarts and counts
them. Without Ray, rank 0 starts an :class:`ExporterProcess` instead. Either
way Prometheus' scrapes are served outside the training processes.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any

from .metrics import MetricsExporter

log = logging.getLogger(__name__)

NAMESPACE = "condmoe"  # Ray namespace of the exporter actors


def _serve_main() -> None:
    """Entry of the exporter child process: argv = job host port socket; key in CONDMOE_EXPORTER_KEY."""
    import os
    import sys
    from multiprocessing.connection import Client

    job, host, port, address = sys.argv[1:5]
    conn = Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop("CONDMOE_EXPORTER_KEY")))
    _serve(job, host, int(port), conn)


def _serve(job: str, host: str, port: int, conn) -> None:
    """Child process of :class:`ExporterProcess`: serve, and run the exporter calls sent down the
    pipe, ``(method, args, reply)``, until "stop" or until the owner goes away."""
    import prometheus_client

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    prometheus_client.disable_created_metrics()  # a dedicated process: no *_created series (smaller scrapes)
    exporter = MetricsExporter(job, host, port)
    try:
        conn.send(("url", exporter.start()))
    except OSError as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        while True:
            try:
                method, args, reply = pickle.loads(conn.recv_bytes())
            except EOFError:  # the owner died: stop serving
                return
            if method == "stop":
                return
            result = getattr(exporter, method)(*args)
            if reply:
                conn.send(result)
    finally:
        exporter.stop()


class ExporterProcess:
    """A MetricsExporter in a child process (no Ray): scrapes never take the training process' GIL.

    Same calls as :class:`MetricsExporter`; updates travel over a Unix socket (a pickled dict per
    push). The child exits when told to or when this process goes away.
    """

    def __init__(self, job: str, host: str = "127.0.0.1", port: int = 0) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"exporter port must be 0..65535, got {port}")
        self.job, self.host, self.port = job, host, int(port)
        self.url: str | None = None
        self._proc = self._conn = None
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 60.0) -> str:
        import os
        import subprocess
        import sys
        import tempfile
        from multiprocessing.connection import Listener

        # a fresh interpreter (not multiprocessing's spawn, which re-imports the caller's __main__),
        # connected back over a Unix socket with a one-time key
        key = os.urandom(16)
        folder = tempfile.mkdtemp(prefix="condmoe-exporter-")
        address = os.path.join(folder, "sock")
        code = "from condmoe.cluster.exporter_hosts import _serve_main; _serve_main()"
        try:
            with Listener(address, family="AF_UNIX", authkey=key) as listener:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", code, self.job, self.host, str(self.port), address],
                    env={**os.environ, "CONDMOE_EXPORTER_KEY": key.hex()}, stdin=subprocess.DEVNULL)
                listener._listener._socket.settimeout(timeout_s)
                try:
                    self._conn = listener.accept()
                except OSError as exc:
                    self.stop()
                    raise TimeoutError(f"exporter process for job {self.job!r} did not connect: {exc}") from None
        finally:
            try:
                os.unlink(address)
            except OSError:
                pass
            os.rmdir(folder)
        if not self._conn.poll(timeout_s):
            self.stop()
            raise TimeoutError(f"exporter process for job {self.job!r} did not start in {timeout_s}s")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            kind, value = "error", "the exporter process exited"
        if kind == "error":
            self.stop()
            raise OSError(f"exporter for job {self.job!r} on {self.host}:{self.port}: {value}")
        self.url = value
        self.port = int(value.rsplit(":", 1)[1].split("/")[0])
        log.info("Prometheus exporter for job %s: %s", self.job, self.url)
        return self.url

    def _call(self, method: str, *args: Any, reply: bool = True) -> Any:
        if self._conn is None:
            raise RuntimeError(f"exporter process for job {self.job!r} is not running")
        with self._lock:
            # plain pickle, not the connection's: torch registers reductions with multiprocessing's
            # pickler that would pass tensors as shared-memory file descriptors
            self._conn.send_bytes(pickle.dumps((method, args, reply)))
            return self._conn.recv() if reply else None

    def update(self, update: dict[str, Any]) -> None:
        self._call("update", update, reply=False)  # fire and forget: training never waits on it

    def scrape_state(self) -> dict[str, float]:
        return self._call("scrape_state")

    def exposition(self) -> str:
        return self._call("exposition")

    def stop(self) -> None:
        if self._conn is not None:
            try:
                self._call("stop", reply=False)
            except (OSError, EOFError):
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None


def actor_name(job: str) -> str:
    return f"condmoe-metrics-{job}"


class _ServingExporter(MetricsExporter):
    """The actor's body: a MetricsExporter that serves from the start (its calls are the actor's)."""

    def __init__(self, job: str, host: str, port: int) -> None:
        import prometheus_client

        logging.basicConfig(level=logging.INFO)
        prometheus_client.disable_created_metrics()  # its own process: no *_created series
        super().__init__(job, host, port)
        self.start()

    def get_url(self) -> str:
        return self.url


def _actor_class():
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(_ServingExporter)


@dataclass
class JobExporter:
    """The driver's handle on a job's exporter actor (``actor`` None: export is off)."""

    job: str
    actor: Any = None
    url: str | None = None
    owned: bool = False

    def stop(self, final_scrape_timeout_s: float = 15.0) -> None:
        """Stop an exporter this driver started, after one more scrape if anyone scrapes it."""
        if self.actor is None or not self.owned:
            return
        import ray

        try:
            wait_for_final_scrape(self.actor, final_scrape_timeout_s)
            ray.get(self.actor.stop.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - a dying exporter must not fail the run
            log.warning("stopping the exporter of job %s: %s", self.job, exc)
        ray.kill(self.actor)
        self.actor = None


def wait_for_final_scrape(actor, timeout_s: float) -> bool:
    """Wait (bounded) until a scrape followed the last update; returns at once if nobody ever scraped."""
    import ray

    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        state = ray.get(actor.scrape_state.remote(), timeout=10)
        if state["scrapes"] == 0 or state["since_update"] > 0:
            return state["scrapes"] > 0
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def find_job_exporter(job: str):
    """The running exporter actor of ``job`` (None when there is none or Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(actor_name(job), namespace=NAMESPACE)
    except ValueError:
        return None


def start_job_exporter(cfg) -> JobExporter:
    """Driver side: the job's exporter actor on the head node (reused if one runs); logs its URL.

    Never raises for runtime problems: monitoring must not stop a training job.
    """
    import ray

    prom = cfg.metrics.prometheus
    job = cfg.run_name
    if not prom.enabled:
        return JobExporter(job)
    existing = find_job_exporter(job)
    try:
        if existing is not None:
            url = ray.get(existing.get_url.remote(), timeout=30)
            log.info("Prometheus exporter for job %s (already running): %s", job, url)
            return JobExporter(job, existing, url, owned=False)
        head = {"node:__internal_head__": 0.001} if "node:__internal_head__" in ray.cluster_resources() else {}
        actor = _actor_class().options(name=actor_name(job), namespace=NAMESPACE, resources=head).remote(
            job, prom.host, prom.port)
        url = ray.get(actor.get_url.remote(), timeout=60)
    except Exception as exc:  # noqa: BLE001
        log.warning("Prometheus exporter for job %s did not start: %s", job, exc)
        return JobExporter(job)
    log.info("Prometheus exporter for job %s: %s", job, url)
    return JobExporter(job, actor, url, owned=True)
