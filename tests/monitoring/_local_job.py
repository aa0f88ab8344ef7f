"""One training process without Ray: rank 0 serves the exporter itself (condmoe.cluster.monitor.local_monitor).

usage: python _local_job.py JOB.yaml OUT_DIR [--set-style overrides...]
Writes OUT_DIR/result.json (the job's own routing totals) and OUT_DIR/exposition.txt (the live
exposition after the last update), after waiting (bounded) for one scrape that saw the final state.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from condmoe.cluster.monitor import local_monitor
from condmoe.trainer.config import load_job
from condmoe.trainer.loop import train


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    job, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_job(job, sys.argv[3:])
    with local_monitor(cfg, 0) as mon:
        res = train(cfg, report=mon.report, on_step=mon.on_step, loader_factory=mon.loader_factory)
        deadline = time.monotonic() + 20
        while mon.exporter.scrape_state()["since_update"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        (out / "exposition.txt").write_text(mon.exporter.exposition())
        (out / "result.json").write_text(json.dumps({"step": res.step, "routing": res.routing,
                                                     "url": mon.exporter.url}))


if __name__ == "__main__":
    main()
