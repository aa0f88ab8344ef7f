"""``condmoe sweep JOB.yaml --grid KEY=V1,V2 ...``, ``condmoe sweep report SWEEP`` and the exit curves of
``condmoe eval RUN --exit-thresholds ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .cli import fail, resolve_job, stdout_to_stderr, worker_log_overrides

USAGE = """condmoe sweep JOB.yaml [--grid KEY=V1,V2,...]... [--variant NAME [KEY=VALUE ...]]... [--seeds N] [options]
       condmoe sweep report SWEEP_DIR [--out DIR]"""

DESCRIPTION = """Run the cross product of job variants as trials on Ray Tune (embedded local Ray, or --address):
named variants (--variant) x grid values (--grid) x seeds (--seeds). Each trial is a normal
condmoe training job with its own Ray Train workers, run directory <storage>/<sweep>/runs/<sweep>-<trial>,
checkpoints and Prometheus job label; as many run at once as the CPUs allow. A restarted sweep skips
finished trials. One row per trial goes to <storage>/<sweep>/trials.parquet.
`condmoe sweep report SWEEP_DIR` writes the table (mean and std over seeds) and the PNG plots."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of job variants with seeds on Ray Tune; `sweep report SWEEP`",
                       usage=USAGE, description=DESCRIPTION)
    p.add_argument("job", metavar="JOB.yaml|report",
                   help="base job file (or condmoe:NAME); the word `report` makes a report of SWEEP_DIR")
    p.add_argument("sweep_dir", nargs="?", metavar="SWEEP_DIR", help="with `report`: the sweep directory")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one job field (repeatable: the cross product); commas inside [...] stay")
    p.add_argument("--variant", action="append", nargs="+", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="a named set of overrides, e.g. --variant thin model.experts=1 (repeatable; the "
                        "grid applies to every variant)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per variant (optim.seed and data.seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the base job (repeatable)")
    p.add_argument("--name", help="sweep name (default: <job stem>-sweep); the sweep lives in "
                                  "<cluster.storage_path>/<name>")
    p.add_argument("--address", help="Ray address (HOST:PORT); with --submit the dashboard URL")
    p.add_argument("--cpus", type=int, default=None, metavar="N", help="embedded Ray: CPUs for the trials' workers "
                                                          "(default: all of this machine's)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="at most N trials at once (default: as many as the CPUs hold)")
    p.add_argument("--exit-thresholds", default="auto", metavar="T1,T2,...|auto|none",
                   help="early-exit families: an exit curve per trial from its checkpoint (default auto: "
                        "0, 0.1, ..., 1)")
    p.add_argument("--submit", action="store_true", help="submit the sweep as a Ray job (condmoe sweep runs on "
                                                          "the cluster; --address is its dashboard URL)")
    p.add_argument("--token", help="with --submit: Ray auth token (default: RAY_AUTH_TOKEN, ~/.ray/auth_token)")
    p.add_argument("--wait", action="store_true", help="with --submit: wait for the job to end")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="with --submit --wait: seconds at most")
    p.add_argument("--out", help="with `report`: folder for the table and the PNGs (default SWEEP_DIR/report)")
    p.add_argument("--json", action="store_true", help="print the result as JSON, alone on stdout")
    p.set_defaults(func=_sweep)


def _thresholds(text: str) -> list[float] | None:
    from condmoe.trainer.exit_curve import DEFAULT_THRESHOLDS, parse_thresholds

    if text == "none":
        return None
    return list(DEFAULT_THRESHOLDS) if text == "auto" else parse_thresholds(text)


def _sweep(args: argparse.Namespace) -> int:
    if args.job == "report" and not Path(args.job).is_file():
        return _report(args)
    if args.sweep_dir:
        return fail("sweep", f"unexpected argument {args.sweep_dir!r} (a sweep takes one job file)")
    from .sweep import make_spec, run_sweep

    overrides = [*args.overrides, *worker_log_overrides(args)]
    spec = make_spec(resolve_job(args.job), overrides=overrides, grid=args.grid, variants=args.variant,
                     seeds=args.seeds, name=args.name, exit_thresholds=_thresholds(args.exit_thresholds))
    if args.submit:
        return _submit(args, spec)
    try:
        with stdout_to_stderr(args.json):  # Ray and Tune print to stdout
            res = run_sweep(spec, address=args.address, cpus=args.cpus, max_concurrent=args.max_concurrent)
    except KeyboardInterrupt:
        from .sweep import done_rows, write_table

        write_table(spec.dir, list(done_rows(spec.dir).values()))
        print(f"condmoe sweep: interrupted; finished trials are kept in {spec.dir} (run again to resume)",
              file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"sweep_dir": str(res.sweep_dir), "table": str(res.table), "ran": res.ran,
                          "skipped": res.skipped, "failed": res.failed, "max_concurrent": res.max_concurrent,
                          "wall_s": res.wall_s, "rows": res.rows}, default=str))
    else:
        _print_rows(res.rows)
        print(f"sweep:  {res.sweep_dir} ({len(res.ran)} trials run, {len(res.skipped)} already done, "
              f"{len(res.failed)} failed; {res.max_concurrent} at once, {res.wall_s:.0f} s)")
        print(f"table:  {res.table}")
    return 1 if res.failed else 0


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['trial']:<40} acc {r['accuracy'] or 0:.4f}  {(r['macs_per_sample'] or 0) / 1e6:8.3f}M MAdds  "
              f"exit {r['exit_rate'] or 0:.2f}  {r['params'] / 1e6:7.3f}M params  {r['wall_s']:6.0f} s  "
              f"{r['images_per_s'] or 0:7.0f} img/s")


def _submit(args: argparse.Namespace, spec) -> int:
    """The sweep as a Ray job: the resolved base job travels as job.yaml, the entrypoint is
    ``condmoe sweep job.yaml`` with this sweep's grid, variants, seeds and name."""
    import tempfile

    import yaml

    from . import jobs

    extra = [a for g in args.grid for a in ("--grid", g)]
    for v in args.variant:
        extra += ["--variant", *v]
    extra += ["--seeds", str(args.seeds), "--name", spec.name, "--exit-thresholds", args.exit_thresholds]
    if args.max_concurrent:
        extra += ["--max-concurrent", str(args.max_concurrent)]
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / f"{spec.name}.yaml"
        job.write_text(yaml.safe_dump(spec.job, sort_keys=False))
        job_id = jobs.submit(str(job), address=args.address, token=args.token, command="sweep", args=extra)
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
    return fail("sweep", f"{job_id} still running after {args.timeout:.0f}s", 1)


def _report(args: argparse.Namespace) -> int:
    from .sweep_report import write_sweep_report

    if not args.sweep_dir:
        return fail("sweep report", "name the sweep directory: condmoe sweep report SWEEP_DIR")
    paths, text = write_sweep_report(args.sweep_dir, args.out)
    if args.json:
        print(json.dumps({"files": [str(p) for p in paths], "summary": text}))
        return 0
    print(text)
    for p in paths:
        print(f"wrote {p}")
    return 0


def run_exit_curve(args: argparse.Namespace) -> int:
    """``condmoe eval RUN --exit-thresholds T1,T2,...``: one pass, a curve, OUT.json + OUT.parquet."""
    from condmoe.trainer.evaluate import exit_curve_checkpoint
    from condmoe.trainer.exit_curve import parse_thresholds, write_curve

    thresholds = parse_thresholds(args.exit_thresholds)
    with stdout_to_stderr(args.json):
        res = exit_curve_checkpoint(args.checkpoint, thresholds, data_path=args.data, split=args.split,
                                    max_batches=args.max_batches)
    out = Path(args.out) if args.out else _default_curve_path(args.checkpoint, res)
    js, pq = write_curve(res, out)
    res["files"] = [str(js), str(pq)]
    if args.json:
        print(json.dumps(res, default=str))
        return 0
    print(f"checkpoint: {res['checkpoint']} (step {res['step']}, {res['model']}; {res['rule']})")
    print(f"light only: accuracy {res['light']['accuracy']:.4f} at {res['light_macs'] / 1e6:.3f}M MAdds; "
          f"full: {res['full']['accuracy']:.4f} at {res['full']['macs_per_sample'] / 1e6:.3f}M "
          f"({res['samples']} images)")
    print(f"{'threshold':>9}  {'accuracy':>8}  {'exit rate':>9}  {'MAdds/image':>11}")
    for r in res["curve"]:
        print(f"{r['threshold']:9.3f}  {r['accuracy']:8.4f}  {r['exit_rate']:9.3f}  "
              f"{r['macs_per_sample'] / 1e6:10.3f}M")
    print(f"wrote {js} and {pq}")
    return 0


def _default_curve_path(target: str, res: dict) -> Path:
    """<run dir>/exit_curve when given a run dir, else beside the checkpoint root."""
    t = Path(target)
    if (t / "metrics.jsonl").is_file() or (t / "checkpoints").is_dir():
        return t / "exit_curve"
    return Path(res["checkpoint"]).parent / "exit_curve"
