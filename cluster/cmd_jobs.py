"""``condmoe submit|status|logs|stop|list``: jobs on a running Ray cluster (Ray Jobs API)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cli import fail, resolve_job


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="dashboard URL, e.g. http://HOST:8265 (default: RAY_ADDRESS)")
    p.add_argument("--token", help="Ray auth token (default: RAY_AUTH_TOKEN, ~/.ray/auth_token)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a job file to a Ray cluster")
    p.add_argument("job", help="job file (YAML), or condmoe:NAME for a job shipped with condmoe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", metavar="RUN_OR_CKPT", help="checkpoint on the cluster's filesystem")
    p.add_argument("--id", dest="submission_id", help="submission id (default: generated)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits at most")
    _common(p)
    p.set_defaults(func=_submit)
    for name, func, text in (("status", _status, "status of a submitted job"),
                             ("stop", _stop, "stop a submitted job"),
                             ("logs", _logs, "logs of a submitted job")):
        q = sub.add_parser(name, help=text)
        q.add_argument("job_id")
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "status":
            q.add_argument("--json", action="store_true")
        _common(q)
        q.set_defaults(func=func)
    q = sub.add_parser("list", help="jobs on the cluster")
    q.add_argument("--json", action="store_true")
    _common(q)
    q.set_defaults(func=_list)


def _submit(args: argparse.Namespace) -> int:
    from . import jobs

    job_id = jobs.submit(resolve_job(args.job), address=args.address, overrides=args.overrides, token=args.token,
                         submission_id=args.submission_id, resume=args.resume)
    print(job_id)
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        st = jobs.status(job_id, address=args.address, token=args.token)
        if st["status"] in jobs.TERMINAL:
            print(f"{job_id}: {st['status']}")
            return 0 if st["status"] == "SUCCEEDED" else 1
        time.sleep(2.0)
    return fail("submit", f"{job_id} still running after {args.timeout:.0f}s", 1)


def _status(args: argparse.Namespace) -> int:
    from . import jobs

    st = jobs.status(args.job_id, address=args.address, token=args.token)
    st.update(jobs.worker_history(args.job_id, address=args.address, token=args.token))
    if args.json:
        print(json.dumps(st, default=str))
        return 0
    print(f"{st['job_id']}: {st['status']}" + (f" ({st['message']})" if st.get("message") else ""))
    if st["workers"] is not None:
        print(f"workers: {st['workers']}" + _resize_text(st["last_resize"], st["attempts"]))
    return 0


def _resize_text(resize: dict | None, attempts: int) -> str:
    if resize is None:
        return f" (no resize; {attempts} attempt{'s' if attempts != 1 else ''})"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(resize["time"]))
    return (f" (last resize {resize['from']} -> {resize['to']} at step {resize['step']}, {when}, "
            f"{max(0.0, time.time() - resize['time']):.0f} s ago)")


def _stop(args: argparse.Namespace) -> int:
    from . import jobs

    ok = jobs.stop(args.job_id, address=args.address, token=args.token)
    print(f"{args.job_id}: {'stop requested' if ok else 'already finished'}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from . import jobs

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    text = jobs.logs(args.job_id, address=args.address, token=args.token, follow=args.follow, write=write)
    if not args.follow:
        sys.stdout.write(text)
    return 0


def _list(args: argparse.Namespace) -> int:
    from . import jobs

    rows = jobs.list_jobs(address=args.address, token=args.token)
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    for r in rows:
        print(f"{r['job_id']}  {r['status']:<9}  {r['entrypoint']}")
    return 0
