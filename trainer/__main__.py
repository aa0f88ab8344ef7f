"""Run one training worker without Ray: ``python -m condmoe.trainer JOB.yaml [--set k=v] [--resume P]``.

Works in a single process and under the plain ``deepspeed`` / ``torchrun``
launchers (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment; the
``--local_rank`` argument the deepspeed launcher adds is accepted). Metrics go
to the log and to <run dir>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import ConfigError, load_job
from .loop import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m condmoe.trainer", description=__doc__.splitlines()[0])
    p.add_argument("job")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", metavar="RUN_OR_CKPT")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_job(args.job, args.overrides)
        os.environ.update(cfg.storage.env())  # the job's S3 endpoint / region / profile (no credentials)
        res = train(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"condmoe.trainer: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"step": res.step, "eval": res.eval, "checkpoint": str(res.checkpoint)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
