"""Checkpoint a real DeepSpeed engine (1 or 2 gloo processes) on S3; optionally hang one rank mid-upload.

usage: python _s3_ckpt_worker.py JOB.yaml MODE OUT.json   (RANK/WORLD_SIZE/MASTER_* and AWS_* from env)

MODE save-then-hang: commit step 1, then save step 2 with rank 1's upload stalled after its first file
     (it writes OUT.uploading and sleeps; the test SIGKILLs it there);
MODE resume: load the newest checkpoint, compare weights with step 1's, save steps 3 and 4.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

import tiny_models  # noqa: E402,F401  (registers test_soft_cnn)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from condmoe.trainer import storage  # noqa: E402
from condmoe.trainer.checkpoint import CheckpointManager, list_checkpoints  # noqa: E402
from condmoe.trainer.config import load_job  # noqa: E402
from condmoe.trainer.engine import build_engine, setup_distributed  # noqa: E402


def _step(engine) -> None:
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    out = engine(x, y)
    engine.backward(out.loss)
    engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def main() -> None:
    job, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cfg = load_job(job)
    rank, world = setup_distributed(cfg)
    engine = build_engine(cfg, world)
    mgr = CheckpointManager(cfg.checkpoint_dir, keep_last=2)
    if mode == "save-then-hang":
        _step(engine)
        mgr.save(engine, 1, {"ep_size": 1})
        if rank == 0:
            torch.save(_weights(engine), out.with_suffix(".w1.pt"))
        _step(engine)
        if rank == 1:
            real = storage.upload_tree

            def stalled(local: Path, url: str) -> None:  # upload one file, then hang (killed here)
                first = sorted(p for p in local.rglob("*") if p.is_file())[0]
                storage.write_bytes(f"{url}/{first.relative_to(local).as_posix()}", first.read_bytes())
                out.with_suffix(".uploading").write_text(str(os.getpid()))
                time.sleep(600)
                real(local, url)

            storage.upload_tree = stalled
        mgr.save(engine, 2, {"ep_size": 1})
        raise SystemExit("step 2 was committed although rank 1 never finished its upload")
    latest = mgr.latest()
    meta = mgr.load(engine, latest, world_size=world, ep_size=1)
    w1 = torch.load(out.with_suffix(".w1.pt"))
    same = all(torch.equal(p, w1[n]) for n, p in engine.module.named_parameters())
    mgr.save(engine, 3, {"ep_size": 1})
    mgr.save(engine, 4, {"ep_size": 1})
    if rank == 0:
        out.write_text(json.dumps({"latest": str(latest), "step": meta["step"], "same_weights": same,
                                   "world": world, "saved_world": meta["world_size"],
                                   "listed": list_checkpoints(mgr.root)}))


if __name__ == "__main__":
    main()
