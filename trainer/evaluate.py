"""``condmoe eval``: accuracy beside multiply-adds per sample of a checkpoint, in one process.

The checkpoint's resolved config rebuilds the model; it is loaded on a world of
one (expert-parallel checkpoints are re-sharded to ep_size 1 through their
portable state) and evaluated on the whole test split, early exits counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from condmoe.datasets.urls import local_path

from .checkpoint import CheckpointManager, read_meta, resolve_checkpoint
from .config import job_from_dict
from .engine import build_engine, setup_distributed
from .loop import evaluate, streaming_loader

log = logging.getLogger(__name__)


def evaluate_checkpoint(ckpt: str | Path, *, data_path: str | None = None, split: str | None = None,
                        max_batches: int | None = None) -> dict:
    """Evaluate a checkpoint (dir, checkpoint root or run dir); returns metrics + routing totals."""
    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    cfg = job_from_dict(yaml.safe_load(meta["config"]), source=str(path / "meta.json"))
    cfg.model.ep_size = 1
    cfg.cluster.workers = 1
    cfg.optim.grad_accum = 1
    if data_path:
        cfg.data.path = data_path
    local = local_path(cfg.data.path)  # None for pipe:, scheme:// URLs and shard patterns
    if local is not None and not local.exists():
        raise FileNotFoundError(f"data.path {cfg.data.path!r} of the checkpoint's job does not exist "
                                "(pass --data SHARD_DIR)")
    if cfg.cluster.use_gpu and not torch.cuda.is_available():  # a GPU run's checkpoint, here without one
        log.info("no CUDA GPU here: evaluating %s on the CPU in float32", path)
        cfg.cluster.use_gpu, cfg.deepspeed.bf16 = False, False
    setup_distributed(cfg)
    engine = build_engine(cfg, 1)
    CheckpointManager(path.parent).load(engine, path, world_size=1, ep_size=1)
    loader = streaming_loader(cfg, split or cfg.data.eval_split, cfg.data.eval_batch_size, 0, 1, False)
    metrics = evaluate(engine, loader, max_batches=max_batches, macs_batches=10**9).as_metrics()
    return {"checkpoint": str(path), "step": meta["step"], "model": cfg.model.name, **metrics,
            "routing": meta.get("routing", {})}
