"""One training process without Ray: rank 0 serves the exporter itself (condmoe.cluster.sinks.job_sinks).

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

from condmoe.cluster.exporter_hosts import ExporterProcess
from condmoe.cluster.sinks import job_sinks
from condmoe.trainer.config import load_job
from condmoe.trainer.loop import train


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    job, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_job(job, sys.argv[3:])
    prom = cfg.metrics.prometheus
    exporter = ExporterProcess(cfg.run_name, prom.host, prom.port)  # ours: it serves on after train()
    exporter.start()
    try:
        res = train(cfg, sinks=job_sinks(cfg, 0, ray_train=False, exporter=exporter))
        deadline = time.monotonic() + 20
        while exporter.scrape_state()["since_update"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        (out / "exposition.txt").write_text(exporter.exposition())
        (out / "result.json").write_text(json.dumps({"step": res.step, "routing": res.routing,
                                                     "url": exporter.url}))
    finally:
        exporter.stop()


if __name__ == "__main__":
    main()
