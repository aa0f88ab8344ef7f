"""``condmoe eval``: accuracy beside multiply-adds per sample of a checkpoint, in one process.

The checkpoint's resolved config rebuilds the model; it is loaded on a world of
one (expert-parallel checkpoints are re-sharded to ep_size 1 through their
portable state) and evaluated on the whole test split, early exits counted.
A job that kept an EMA of its weights (``optim.ema``) is evaluated with it, as
its training run was.
:func:`exit_curve_checkpoint` evaluates an early-exit family (BasisNet, CoE)
at many exit thresholds in one pass (condmoe.trainer.exit_curve).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import yaml

from condmoe.datasets.urls import local_path

from .checkpoint import CheckpointManager, read_meta, resolve_checkpoint
from .config import JobConfig, job_from_dict
from .ema import build_ema
from .engine import build_engine, setup_distributed
from .loop import evaluate, streaming_loader

log = logging.getLogger(__name__)


def _load(ckpt: str | Path, data_path: str | None, exit_threshold: float | None | str = "keep"):
    """(cfg, engine, meta, checkpoint path) of a checkpoint loaded on a world of one; the engine
    holds the checkpoint's EMA weights when its job kept them (``optim.ema``).

    exit_threshold: a value (None: never exit) replaces the job's ``model.options.exit_threshold``.
    """
    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    cfg = job_from_dict(yaml.safe_load(meta["config"]), source=str(path / "meta.json"))
    cfg.model.ep_size = 1
    cfg.cluster.workers = 1
    cfg.optim.grad_accum = 1
    if data_path:
        cfg.data.path = data_path
    if exit_threshold != "keep":
        if not hasattr(cfg.model.options, "exit_threshold"):
            raise ValueError(f"model {cfg.model.name!r} has no exit_threshold option (no early exit)")
        cfg.model.options = dataclasses.replace(cfg.model.options, exit_threshold=exit_threshold)
    local = local_path(cfg.data.path)  # None for pipe:, scheme:// URLs and shard patterns
    if local is not None and not local.exists():
        raise FileNotFoundError(f"data.path {cfg.data.path!r} of the checkpoint's job does not exist "
                                "(pass --data SHARD_DIR)")
    if cfg.cluster.use_gpu and not torch.cuda.is_available():  # a GPU run's checkpoint, here without one
        log.info("no CUDA GPU here: evaluating %s on the CPU in float32", path)
        cfg.cluster.use_gpu, cfg.deepspeed.bf16 = False, False
    setup_distributed(cfg)
    engine = build_engine(cfg, 1)
    ema = build_ema(cfg, engine.module)
    CheckpointManager(path.parent, ema=ema).load(engine, path, world_size=1, ep_size=1)
    if ema is not None:  # evaluated as the run evaluated it; nothing trains this engine
        ema.copy_to_model()
    return cfg, engine, meta, path


def _loader(cfg: JobConfig, split: str | None):
    return streaming_loader(cfg, split or cfg.data.eval_split, cfg.data.eval_batch_size, 0, 1, False)


def evaluate_checkpoint(ckpt: str | Path, *, data_path: str | None = None, split: str | None = None,
                        max_batches: int | None = None, exit_threshold: float | None | str = "keep") -> dict:
    """Evaluate a checkpoint (dir, checkpoint root or run dir); returns metrics + routing totals.

    exit_threshold: evaluate at this exit threshold instead of the job's (None: never exit).
    """
    cfg, engine, meta, path = _load(ckpt, data_path, exit_threshold)
    metrics = evaluate(engine, _loader(cfg, split), max_batches=max_batches, macs_batches=10**9).as_metrics()
    return {"checkpoint": str(path), "step": meta["step"], "model": cfg.model.name, **metrics,
            "ema": cfg.optim.ema.enabled, "routing": meta.get("routing", {})}


def exit_curve_checkpoint(ckpt: str | Path, thresholds: list[float], *, data_path: str | None = None,
                          split: str | None = None, max_batches: int | None = None) -> dict:
    """Accuracy, exit rate and average MAdds per image at every threshold, from ONE pass over the split.

    Returns {"checkpoint", "step", "model", "rule", "samples", "light_macs", "heavy_macs",
    "light": {...}, "full": {...}, "curve": [{threshold, accuracy, exit_rate, macs_per_sample}]}.
    """
    from .exit_curve import exit_pass

    cfg, engine, meta, path = _load(ckpt, data_path)
    res = exit_pass(engine.module, _loader(cfg, split), max_batches=max_batches)
    return {"checkpoint": str(path), "step": meta["step"], "model": cfg.model.name, "rule": res.rule.text,
            "samples": int(res.labels.numel()), "light_macs": res.light_macs, "heavy_macs": res.heavy_macs,
            **res.endpoints(), "curve": res.curve(thresholds)}
