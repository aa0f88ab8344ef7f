"""condmoe.trainer: what runs inside one worker: config, engine, loop, checkpoints.

Public API (the rest is internal)::

    cfg = load_job("configs/condconv.yaml", ["optim.steps=200"])
    result = train(cfg, sinks=[JsonlSink(cfg.run_dir / "metrics.jsonl"), my_sink])  # records -> sinks
    evaluate_checkpoint("runs/condconv")
"""

from .checkpoint import CheckpointManager, latest_checkpoint, list_checkpoints, read_meta, resolve_checkpoint
from .config import ConfigError, JobConfig, deepspeed_config, dump_job, job_from_dict, load_job
from .evaluate import evaluate_checkpoint
from .loop import TrainResult, default_sinks, evaluate, train
from .records import CheckpointRecord, EvalRecord, JsonlSink, MetricsSink, RestartRecord, StepRecord

__all__ = [
    "CheckpointManager", "CheckpointRecord", "ConfigError", "EvalRecord", "JobConfig", "JsonlSink",
    "MetricsSink", "RestartRecord", "StepRecord", "TrainResult", "default_sinks", "deepspeed_config",
    "dump_job", "evaluate", "evaluate_checkpoint", "job_from_dict", "latest_checkpoint", "list_checkpoints",
    "load_job", "read_meta", "resolve_checkpoint", "train",
]
