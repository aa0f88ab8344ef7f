"""``condmoe experts`` (terminal view of expert use, live) and ``condmoe report`` (PNG plots + summary)."""

from __future__ import annotations

import argparse
import logging
import time
import urllib.request
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from .expert_view import expert_table

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:9108/metrics"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experts", help="expert load per layer (imbalance, entropy) of a run or a live exporter")
    p.add_argument("target", nargs="?", default=DEFAULT_URL,
                   help=f"run directory (its Parquet log) or exporter URL (default {DEFAULT_URL})")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted (Ctrl-C)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--iterations", type=int, default=None, help="with --watch: stop after N refreshes")
    p.add_argument("--job", default=None, help="job label to show when an exporter serves several")
    p.add_argument("--last", type=int, default=None, metavar="STEPS",
                   help="run directory: only the reports of the last STEPS steps (default: whole run)")
    p.set_defaults(func=run_experts)

    r = sub.add_parser("report", help="PNG plots (expert load, imbalance, entropy, loss, accuracy) and a summary")
    r.add_argument("run", help="run directory (<storage_path>/<run name>)")
    r.add_argument("--out", default=None, help="folder for the PNGs (default RUN/report)")
    r.set_defaults(func=run_report)


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def _load(args: argparse.Namespace) -> tuple[dict, str]:
    """({layer: RoutingStats}, title) from an exporter URL or a run directory."""
    target = args.target
    if _is_url(target):
        from .metrics import parse_exposition

        try:
            with urllib.request.urlopen(target, timeout=10) as resp:
                text = resp.read().decode()
        except OSError as exc:
            raise ValueError(f"cannot scrape {target!r}: {getattr(exc, 'reason', exc)}") from None
        stats = parse_exposition(text, args.job)
        step = next((f"{float(line.split()[-1]):.0f}" for line in text.splitlines()
                     if line.startswith("condmoe_train_last_step")), "?")
        return stats, f"expert use from {target} (run totals, step {step})"
    from .parquet_log import read_routing, routing_totals

    run = Path(target)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {target!r} not found (or pass an http:// exporter URL)")
    stats = routing_totals(run, args.last)
    step = max(read_routing(run).column("step").to_pylist() or [0])
    span = f"last {args.last} steps" if args.last else "run totals"
    return stats, f"expert use of {run.name} ({span}, step {step})"


def _console() -> Console:
    return Console(width=None if Console().is_terminal else 160)  # a pipe or log gets whole layer names


def run_experts(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0, got {args.interval}")
    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    console = _console()
    if not args.watch:
        stats, title = _load(args)
        if not stats:
            console.print(f"{title}: no routed layers reported yet")
            return 1
        console.print(expert_table(stats, title=title))
        return 0
    n = 0

    def view():
        try:
            stats, title = _load(args)
            return expert_table(stats, title=title) if stats else Text(f"{title}: no routed layers yet")
        except (OSError, ValueError) as exc:  # a job not started yet, or just finished: keep watching
            return Text(f"waiting for {args.target}: {exc}")

    try:
        with Live(view(), console=console, auto_refresh=False) as live:
            n = 1
            while args.iterations is None or n < args.iterations:
                time.sleep(args.interval)
                live.update(Group(view()), refresh=True)
                n += 1
    except KeyboardInterrupt:
        pass
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .plots import write_report

    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {args.run!r} not found")
    paths, text = write_report(run, args.out)
    console = _console()
    console.print(text, highlight=False)
    for p in paths:
        console.print(f"wrote {p}", highlight=False)
    return 0
