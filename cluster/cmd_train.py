"""``condmoe train JOB.yaml`` and ``condmoe eval CHECKPOINT``."""

from __future__ import annotations

import argparse
import json
import logging

from .cli import resolve_job, stdout_to_stderr, training_failed, worker_log_overrides

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a job on Ray (embedded local Ray without --address)")
    p.add_argument("job", help="job file (YAML), or condmoe:NAME for a job shipped with condmoe "
                               "(condmoe:condconv is configs/condconv.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field, e.g. --set optim.steps=200 (repeatable)")
    p.add_argument("--resume", metavar="RUN_OR_CKPT", help="checkpoint dir, checkpoint root or run dir")
    p.add_argument("--address", help="Ray cluster address (HOST:PORT or ray://HOST:10001)")
    p.add_argument("--json", action="store_true",
                   help="print the final metrics as JSON, alone on stdout (every log line goes to stderr)")
    p.set_defaults(func=_train)

    e = sub.add_parser("eval", help="accuracy and multiply-adds per sample of a checkpoint")
    e.add_argument("checkpoint", help="checkpoint dir, checkpoint root or run dir")
    e.add_argument("--data", help="shard directory (default: the checkpoint job's data.path)")
    e.add_argument("--split", help="split to evaluate (default: the job's eval_split)")
    e.add_argument("--max-batches", type=int, default=None)
    e.add_argument("--exit-thresholds", metavar="T1,T2,...", default=None,
                   help="early-exit families (BasisNet, CoE): accuracy vs average MAdds at each threshold, "
                        "from one pass over the split (condmoe.trainer.exit_curve)")
    e.add_argument("--out", default=None, help="with --exit-thresholds: write OUT.json and OUT.parquet "
                                               "(default <run dir>/exit_curve)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON, alone on stdout")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from .launch import load_and_launch

    overrides = [*args.overrides, *worker_log_overrides(args)]
    try:
        with stdout_to_stderr(args.json):  # Ray forwards the workers' stdout to ours
            res = load_and_launch(resolve_job(args.job), overrides, resume=args.resume, address=args.address)
    except RuntimeError as exc:  # ray.train's TrainingFailedError and friends
        return training_failed("train", exc)
    if res.stopped:
        return _stopped(res, args.json)
    if res.error:
        return training_failed("train", res.error)
    m = res.metrics
    if args.json:
        print(json.dumps({"metrics": m, "checkpoint": str(res.checkpoint), "run_dir": str(res.run_dir)},
                         default=str))
        return 0
    print(f"run:        {res.run_dir}")
    print(f"step:       {m.get('step')}  loss {m.get('loss', float('nan')):.4f}")
    if "eval_accuracy" in m:
        print(f"accuracy:   {m['eval_accuracy']:.4f} on {int(m['eval_samples'])} samples")
        print(f"MAdds:      {m['eval_macs_per_sample'] / 1e6:.3f}M per sample "
              f"(early-exit rate {m['eval_exit_rate']:.3f})")
    print(f"checkpoint: {res.checkpoint}")
    return 0


def _stopped(res, as_json: bool) -> int:
    """condmoe train got SIGTERM / Ctrl-C: say where it stopped; exit 128 + the signal's number."""
    import signal
    import sys

    step = res.metrics.get("step")
    if as_json:
        print(json.dumps({"stopped": res.stopped, "metrics": res.metrics, "checkpoint": str(res.checkpoint),
                          "run_dir": str(res.run_dir), "error": res.error}, default=str))
    if res.error:
        print(f"condmoe train: stopped by {res.stopped} without a new checkpoint ({res.error}); the newest one "
              f"in {res.run_dir} stays", file=sys.stderr)
    else:
        print(f"condmoe train: stopped by {res.stopped} after step {step}; checkpoint {res.checkpoint} (the same "
              "command resumes there)", file=sys.stderr)
    return 128 + int(getattr(signal, res.stopped, signal.SIGTERM))


def _eval(args: argparse.Namespace) -> int:
    from condmoe.trainer.evaluate import evaluate_checkpoint

    if args.exit_thresholds is not None:
        from .cmd_sweep import run_exit_curve

        return run_exit_curve(args)
    with stdout_to_stderr(args.json):
        res = evaluate_checkpoint(args.checkpoint, data_path=args.data, split=args.split,
                                  max_batches=args.max_batches)
    if args.json:
        print(json.dumps(res, default=str))
        return 0
    print(f"checkpoint: {res['checkpoint']} (step {res['step']}, {res['model']})")
    print(f"accuracy:   {res['eval_accuracy']:.4f} on {int(res['eval_samples'])} samples"
          + (" (the weights' moving average, optim.ema)" if res.get("ema") else ""))
    print(f"MAdds:      {res['eval_macs_per_sample'] / 1e6:.3f}M per sample "
          f"(early-exit rate {res['eval_exit_rate']:.3f})")
    for name, st in res["routing"].items():
        load = st["load"]
        total = sum(load) or 1.0
        shares = " ".join(f"{x / total:5.1%}" for x in load)
        print(f"experts {name}: {shares}  entropy {st['entropy']:.3f} dropped {st['dropped']}")
    return 0
