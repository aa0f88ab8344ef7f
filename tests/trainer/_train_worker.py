"""One training worker process for the multi-process trainer tests (no Ray).

usage: python _train_worker.py JOB.yaml OUT.json [RESUME] ; RANK/WORLD_SIZE/MASTER_* from env.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402,F401  (registers test_soft_cnn / test_moe_cnn)

from condmoe.trainer.config import load_job  # noqa: E402
from condmoe.trainer.loop import streaming_loader, train  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    job, out = sys.argv[1], sys.argv[2]
    resume = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    overrides = sys.argv[4:]
    cfg = load_job(job, overrides)
    res = train(cfg, loader_factory=streaming_loader, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "step": res.step, "losses": res.losses, "eval": res.eval, "routing": res.routing,
            "checkpoint": str(res.checkpoint), "resumed_from": str(res.resumed_from)}))


if __name__ == "__main__":
    main()
