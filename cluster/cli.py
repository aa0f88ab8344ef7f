"""The ``condmoe`` command.

Each command group lives in its own module under cluster/ and adds itself
through a ``register(subparsers)`` function. This file wires them and holds
what they share: the one-line error (:func:`fail`), ``--json``'s clean stdout
(:func:`stdout_to_stderr`) and the job files shipped with the package
(:func:`resolve_job`: ``condmoe:NAME`` is ``configs/NAME.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.resources
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# modules that define register(subparsers); each adds one or more subcommands
_COMMAND_MODULES: tuple[str, ...] = (
    "condmoe.cluster.cmd_demo",
    "condmoe.cluster.cmd_shards",
    "condmoe.cluster.cmd_train",
    "condmoe.cluster.cmd_jobs",
    "condmoe.cluster.cmd_monitor",
    "condmoe.cluster.cmd_sweep",
)

# `condmoe train condmoe:coe`: a job file of configs/, installed with the package as condmoe.configs
SHIPPED_PREFIX = "condmoe:"

# errors a user can fix (bad file, value, address): one line, exit 2, no traceback
_USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ConnectionError)


def fail(command: str, message: object, code: int = 2) -> int:
    """Print ``condmoe COMMAND: error: MESSAGE`` on stderr, as one line; return the exit status."""
    text = " ".join(str(message).split()) or repr(message)
    print(f"condmoe {command}: error: {text}", file=sys.stderr)
    return code


def training_failed(command: str, exc: BaseException | str) -> int:
    """A run that failed (Ray Train's TrainingFailedError and friends): its first line, exit 1."""
    lines = str(exc).strip().splitlines()
    return fail(command, f"training failed: {lines[0] if lines else repr(exc)}", 1)


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
    """While the block runs, everything written to stdout goes to stderr.

    At the OS level (fd 1 is pointed at fd 2), so Ray's forwarded worker lines, C++ libraries and
    child processes started in the block (an embedded Ray's daemons keep it) are caught too;
    stdout is restored afterwards for ``--json``'s one document.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):  # sys.stdout objects that are not fd 1 (pytest)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def shipped_jobs() -> dict[str, Path]:
    """{name: path} of the job files installed with condmoe (``condmoe:NAME``)."""
    root = importlib.resources.files("condmoe.configs")
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_job(job: str) -> str:
    """A job file path: ``condmoe:NAME`` names a shipped job, anything else is a path as given."""
    if not job.startswith(SHIPPED_PREFIX):
        return job
    name = job.removeprefix(SHIPPED_PREFIX).removesuffix(".yaml")
    jobs = shipped_jobs()
    if name not in jobs:
        known = ", ".join(SHIPPED_PREFIX + n for n in sorted(jobs))
        raise FileNotFoundError(f"no shipped job {job!r} (shipped: {known})")
    return str(jobs[name])


def worker_log_overrides(args: argparse.Namespace) -> list[str]:
    """Job overrides for ``-v``: the workers show Ray Train's per-report lines too."""
    from .ray_logs import VERBOSE_ENV

    return [f"cluster.env.{VERBOSE_ENV}=1"] if getattr(args, "verbose", False) else []


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the command too (``condmoe train JOB -v``), in every subcommand."""
    # SUPPRESS: a subcommand without -v keeps the value parsed before the command
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and Ray Train's per-report lines from the workers")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="condmoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray Train's per-report lines from the workers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    for child in sub.choices.values():
        _add_verbose(child)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        action = getattr(args, "shards_command", None)  # "shards write": the command as typed
        return fail(f"{args.command} {action}" if action else args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
