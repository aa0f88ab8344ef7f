"""Checkpoint a real single-process DeepSpeed engine; optionally SIGKILL itself mid-write.

usage: python _ckpt_worker.py JOB.yaml save-then-kill|load OUT.json
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402,F401
import torch  # noqa: E402

from condmoe.trainer.checkpoint import CheckpointManager  # noqa: E402
from condmoe.trainer.config import load_job  # noqa: E402
from condmoe.trainer.ds_checkpoint import read_portable  # noqa: E402
from condmoe.trainer.engine import build_engine, setup_distributed  # noqa: E402


def _step(engine) -> float:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    out = engine(x, y)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss)


def main() -> None:
    job, mode, out = sys.argv[1:4]
    cfg = load_job(job)
    setup_distributed(cfg)
    engine = build_engine(cfg, 1)
    mgr = CheckpointManager(cfg.checkpoint_dir, keep_last=3)
    if mode == "save-then-kill":
        _step(engine)
        mgr.save(engine, 1, {"ep_size": 1})
        w1 = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save(w1, Path(out).with_suffix(".w1.pt"))
        _step(engine)
        mgr.save(engine, 2, {"ep_size": 1},
                 before_commit=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
        raise SystemExit("not killed")
    latest = mgr.latest()
    meta = mgr.load(engine, latest, world_size=1, ep_size=1)
    w1 = torch.load(Path(out).with_suffix(".w1.pt"))
    same = all(torch.equal(p, w1[n]) for n, p in engine.module.named_parameters())
    saved = mgr.save(engine, 3, {"ep_size": 1})
    portable = read_portable(saved)  # JSON index + weights-only tensor chunks: plain data only
    same_portable = all(torch.equal(portable["params"][n]["param"], p) for n, p in engine.module.named_parameters())
    Path(out).write_text(json.dumps({"latest": str(latest), "step": meta["step"], "same_weights": same,
                                     "portable_weights_only": same_portable}))


if __name__ == "__main__":
    main()
