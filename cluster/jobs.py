"""Ray Jobs API: submit a job file to a running Ray cluster, then watch, stop and list jobs.

``submit`` validates the job file locally (schema, overrides), writes the
resolved job into a temporary folder that travels as the job's runtime-env
``working_dir``, and runs ``condmoe train job.yaml`` on the cluster (the driver
connects to the cluster through the RAY_ADDRESS the Jobs API sets). Paths in
the job (data, storage) refer to the cluster's filesystem.

Token authentication (Ray 2.5x+ clusters started with RAY_AUTH_MODE=token) is
passed through: a token given explicitly, in RAY_AUTH_TOKEN, in the file named
by RAY_AUTH_TOKEN_PATH or in ~/.ray/auth_token is sent as a Bearer header. It
is never switched off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from condmoe.trainer.config import dump_job, load_job

log = logging.getLogger(__name__)

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def find_token(explicit: str | None = None) -> str | None:
    """The Ray auth token: explicit > RAY_AUTH_TOKEN > RAY_AUTH_TOKEN_PATH file > ~/.ray/auth_token."""
    if explicit:
        return explicit.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and Path(path).is_file():
            text = Path(path).read_text().strip()
            if text:
                return text
    return None


def normalize_address(address: str | None) -> str:
    """Dashboard URL of the cluster (http://HOST:8265); RAY_ADDRESS when not given."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    if address.startswith("ray://"):
        raise ValueError(f"address {address!r}: the Jobs API needs the dashboard URL, http://HOST:8265")
    return address


def client(address: str | None, token: str | None = None):
    """A JobSubmissionClient with the auth header when a token is known.

    Raises ConnectionError naming the address when the cluster does not answer.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = normalize_address(address)
    tok = find_token(token)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except ConnectionError as exc:
        raise ConnectionError(f"Ray cluster at {url} is unreachable: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, AuthenticationError) as exc:  # 401/403: token missing or wrong
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = "" if tok else " (no token found: set RAY_AUTH_TOKEN or pass --token)"
        raise ConnectionError(f"Ray cluster at {url} refused the connection: {why}{hint}") from None


def submit(job_path: str, *, address: str | None, overrides: list[str] | None = None,
           token: str | None = None, submission_id: str | None = None,
           resume: str | None = None, agent_wait_s: float = 60.0, command: str = "train",
           args: list[str] | None = None) -> str:
    """Validate and submit ``job_path``; returns the submission id.

    The entrypoint is ``condmoe COMMAND job.yaml ARGS...`` (``condmoe train job.yaml`` by default;
    ``condmoe sweep ... --submit`` sends ``command="sweep"`` and the sweep's own arguments).
    Waits up to ``agent_wait_s`` for the cluster's job agent (a fresh head node).
    """
    cfg = load_job(job_path, overrides)
    c = client(address, token)
    workdir = Path(tempfile.mkdtemp(prefix="condmoe-submit-"))
    (workdir / "job.yaml").write_text(dump_job(cfg))
    entry = f"condmoe {command} job.yaml"
    if resume:
        entry += f" --resume {resume}"
    if args:
        entry += " " + shlex.join(args)
    # env vars for the workers come from the driver's ray.init (a job-level copy would conflict)
    runtime_env: dict[str, Any] = {"working_dir": str(workdir)}
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = c.submit_job(entrypoint=entry, runtime_env=runtime_env, submission_id=submission_id,
                                  metadata={"condmoe_run": cfg.run_name, "job_file": str(job_path)})
            break
        except RuntimeError as exc:
            # a head node that just started answers 500 until its job agent is up
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    log.info("submitted %s as %s", job_path, job_id)
    return job_id


def status(job_id: str, *, address: str | None, token: str | None = None) -> dict:
    """{'status': PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED, 'message': ..., ...}."""
    info = client(address, token).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time}


def logs(job_id: str, *, address: str | None, token: str | None = None, follow: bool = False,
         write: Callable[[str], None] | None = None) -> str:
    """The job's logs; with ``follow`` streams them to ``write`` until the job ends."""
    c = client(address, token)
    if not follow:
        return c.get_job_logs(job_id)

    chunks: list[str] = []

    async def _tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            chunks.append(chunk)
            if write is not None:
                write(chunk)

    asyncio.run(_tail())
    return "".join(chunks)


def parse_attempts(text: str) -> dict:
    """The worker-group attempts in a job's logs (the lines condmoe.cluster.sinks.AttemptLogSink writes):
    ``{"workers": N or None, "attempts": count, "last_resize": {"from", "to", "step", "time"} or None}``."""
    import re

    from .sinks import ATTEMPT_RE

    seen: list[tuple[int, int, float]] = []
    for m in re.finditer(ATTEMPT_RE, text):
        attempt = (int(m.group(1)), int(m.group(2)), float(m.group(3)))
        if attempt not in seen:  # Ray may print a forwarded line twice
            seen.append(attempt)
    seen.sort(key=lambda a: a[2])
    resize = None
    for (w0, _, _), (w1, step, t) in zip(seen, seen[1:]):
        if w1 != w0:
            resize = {"from": w0, "to": w1, "step": step, "time": t}
    return {"workers": seen[-1][0] if seen else None, "attempts": len(seen), "last_resize": resize}


def worker_history(job_id: str, *, address: str | None, token: str | None = None) -> dict:
    """The job's current worker count and its last resize (:func:`parse_attempts` of its logs)."""
    return parse_attempts(client(address, token).get_job_logs(job_id))


def stop(job_id: str, *, address: str | None, token: str | None = None) -> bool:
    """Ask the cluster to stop the job; True if a stop was requested."""
    return bool(client(address, token).stop_job(job_id))


def list_jobs(*, address: str | None, token: str | None = None) -> list[dict]:
    """Every job the cluster knows, oldest first."""
    out = []
    for d in client(address, token).list_jobs():
        out.append({"job_id": d.submission_id or d.job_id,
                    "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                    "entrypoint": d.entrypoint, "start_time": d.start_time})
    return sorted(out, key=lambda d: d["start_time"] or 0)
