"""One training process with condmoe's SIGTERM handling, no Ray (tests/cluster/test_preempt.py).

usage: python _stop_worker.py JOB.yaml OUT_PREFIX ; RANK/WORLD_SIZE/MASTER_* from env.
CONDMOE_TEST_GRACE: grace seconds (default 30). CONDMOE_TEST_SLOW_SAVE: seconds every checkpoint
write sleeps, once the stop was requested, after DeepSpeed's files and before the commit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

import tiny_models  # noqa: E402,F401  (registers test_soft_cnn / test_moe_cnn)

from condmoe.trainer import ds_checkpoint  # noqa: E402
from condmoe.trainer.config import load_job  # noqa: E402
from condmoe.trainer.loop import train  # noqa: E402
from condmoe.trainer.stop import SignalStop  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = load_job(sys.argv[1])
    stop = SignalStop(float(os.environ.get("CONDMOE_TEST_GRACE", "30"))).install()
    slow = float(os.environ.get("CONDMOE_TEST_SLOW_SAVE", "0"))
    if slow:
        save_state = ds_checkpoint.save_state

        def slow_save(*args, **kwargs):
            out = save_state(*args, **kwargs)
            if stop.poll():
                time.sleep(slow)
            return out

        ds_checkpoint.save_state = slow_save
        import condmoe.trainer.checkpoint as checkpoint

        if hasattr(checkpoint, "save_state"):
            checkpoint.save_state = slow_save
    res = train(cfg, stop=stop)
    Path(f"{sys.argv[2]}-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({
        "step": res.step, "stopped": res.stopped, "checkpoint": str(res.checkpoint),
        "resumed_from": str(res.resumed_from), "losses": res.losses}))


if __name__ == "__main__":
    main()
