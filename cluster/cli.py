"""The ``condmoe`` command.

Each command group lives in its own module under cluster/ and adds itself
through a ``register(subparsers)`` function; this file only wires them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules that define register(subparsers); each adds one or more subcommands
_COMMAND_MODULES: tuple[str, ...] = (
    "condmoe.cluster.cmd_demo",
    "condmoe.cluster.cmd_shards",
    "condmoe.cluster.cmd_train",
    "condmoe.cluster.cmd_jobs",
    "condmoe.cluster.cmd_monitor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="condmoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
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
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # user errors: one clear line, non-zero exit, no traceback
        print(f"condmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
