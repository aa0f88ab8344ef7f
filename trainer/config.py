"""The job file: one YAML file validated into one typed config tree.

``load_job(path, overrides)`` reads a job file, applies ``--set a.b=c``
overrides and returns a :class:`JobConfig`. Unknown keys and wrong types raise
:class:`ConfigError`, one line naming the field and the file. The DeepSpeed
JSON is generated from the tree by :func:`deepspeed_config` (never kept by
hand beside it). The ``model`` section is a union discriminated by ``model.name``:
each registered family's options are typed (a dataclass next to its builder in
condmoe.routing.models), so a misspelt model option fails here too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from condmoe.datasets.urls import ENDPOINT_ENV, REGION_ENV, is_s3, local_path

if TYPE_CHECKING:
    from condmoe.routing.models import ModelFamily

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A job file that does not validate; the message is one line naming field and file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which registered network to train (condmoe.routing.build_model): a union discriminated by ``name``.

    Validating a mapping returns the named family's own subclass (:func:`model_config_class`),
    generated from the registry: ``size`` one of the family's sizes, ``options`` the family's
    options dataclass (declared next to its builder), so a misspelt or mistyped option is
    a field error here. ``model_dump()`` and validating it again give an equal config.
    """

    name: str = Field(description="registered model family, e.g. condconv_cnn, coe_cnn")
    size: str = Field("small", description="named size of the family: tiny, small, base")
    experts: int = Field(8, ge=1, description="number of experts / basis models")
    num_classes: int = Field(10, ge=2, description="classes of the classification head")
    in_channels: int = Field(1, ge=1, description="input image channels (1 for Fashion-MNIST)")
    ep_size: int = Field(
        1, ge=1, description="expert-parallel group size for hard-routed (deepspeed.moe) models"
    )
    options: Any = Field(None, description="the family's typed options (its options dataclass)")
    channels_last: bool = Field(
        False, description="channels-last (NHWC) memory format for the input images, which the "
                           "convolutions' activations then keep: faster convolutions on tensor-core GPUs, "
                           "most of all in bf16 (the weights stay contiguous: DeepSpeed flattens them)")

    @model_validator(mode="wrap")
    @classmethod
    def _family(cls, data: Any, handler: Any) -> "ModelConfig":
        if cls is not ModelConfig or not isinstance(data, dict) or "name" not in data:
            return handler(data)  # a family's own class, an instance, or a mapping without a name
        name = data["name"]
        try:
            family_cls = model_config_class(name)
        except ValueError as err:  # unknown family: the error lists the registered ones
            raise _field_error("name", str(err), name) from None
        return family_cls.model_validate(data)

    @model_validator(mode="after")
    def _check_ep(self) -> "ModelConfig":
        if self.ep_size > 1 and not self.family.expert_parallel:
            raise _field_error("ep_size", f"model {self.name!r} has no expert-parallel layers: ep_size must "
                               f"be 1, got {self.ep_size}", self.ep_size)
        return self

    @property
    def family(self) -> ModelFamily:
        """The registered family: builder, sizes, options class, expert parallelism."""
        from condmoe.routing.models import model_family

        return model_family(self.name)

    @property
    def hard_routed(self) -> bool:
        """True for families built on deepspeed.moe (their builders take ep_size)."""
        return self.family.expert_parallel or self.ep_size > 1

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``condmoe.routing.build_model(name, size, **kwargs)``."""
        return {"experts": self.experts, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "ep_size": self.ep_size,
                "options": None if isinstance(self.options, NoOptions) else self.options}

    def __reduce__(self):  # the family classes are generated: pickle by value, rebuilt by name
        return _model_config_from_dict, (self.model_dump(),)


def _field_error(field: str, msg: str, value: Any) -> ValidationError:
    """A validation error at ``field`` (relative to the model being validated) whose message is ``msg``."""
    return ValidationError.from_exception_data("config", [
        {"type": PydanticCustomError("config_field", msg), "loc": (field,), "input": value}])


@dataclass(frozen=True)
class NoOptions:
    """The options of a family registered without an options class: none."""

    __pydantic_config__ = {"extra": "forbid"}


# family name -> its generated ModelConfig subclass (made once, so configs compare equal)
_FAMILY_CONFIGS: dict[str, type[ModelConfig]] = {}


def model_config_class(name: str) -> type[ModelConfig]:
    """The ModelConfig subclass of the registered family ``name`` (ValueError if unknown):
    ``name: Literal[name]``, ``size: Literal[*sizes]``, ``options: <its options dataclass>``."""
    from condmoe.routing.models import model_family

    family = model_family(name)
    cls = _FAMILY_CONFIGS.get(name)
    if cls is None:
        options = family.options or NoOptions
        if getattr(options, "__pydantic_config__", {}).get("extra") != "forbid":
            raise TypeError(f"{options.__qualname__} (model {name!r} options) must set "
                            "__pydantic_config__ = {'extra': 'forbid'} so a misspelt option is an error")
        default_size = "small" if "small" in family.sizes else family.sizes[0]
        cls = create_model(
            f"ModelConfig[{name}]", __base__=ModelConfig, __module__=__name__,
            name=(Literal[name], Field(description="registered model family")),
            size=(Literal[family.sizes], Field(default_size, description="named size of the family")),
            options=(options, Field(default_factory=options, description=f"{name}'s options")),
        )
        _FAMILY_CONFIGS[name] = cls
    return cls


def _model_config_from_dict(data: dict) -> ModelConfig:
    return ModelConfig.model_validate(data)


class DataConfig(_Section):
    """Where samples come from: a shard directory written by ``condmoe shards write``."""

    path: str = Field(description="shard directory holding manifest.parquet (or a URL pattern)")
    train_split: str = Field("train", description="split trained on")
    eval_split: str = Field("test", description="split evaluated on")
    batch_size: int = Field(
        64, ge=1, description="GLOBAL batch size per optimiser step (split over workers and "
        "gradient-accumulation micro-steps, so resuming on another worker count keeps it)",
    )
    eval_batch_size: int = Field(256, ge=1, description="per-worker batch size of evaluation")
    num_workers: int = Field(0, ge=0, description="loader worker processes per training worker")
    seed: int = Field(0, description="seed of the shard/sample order (pure function of seed, epoch)")
    augment: bool = Field(False, description="random flips/crops on training samples")
    resolution: int | None = Field(
        None, ge=8, description="decode every image to resolution x resolution (the photo path: "
        "RandomResizedCrop + flip when augmenting, else resize to resolution/0.875 + centre crop; "
        "needed for shards of original JPEGs of varying size); None: images as stored",
    )


class EmaConfig(_Section):
    """An exponential moving average of the weights, used for evaluation and saved in checkpoints
    (condmoe.trainer.ema; the EfficientNet/MobileNet recipes' ``moving_average_decay``)."""

    enabled: bool = Field(False, description="keep an fp32 EMA of the weights (ZeRO stage <= 2)")
    decay: float = Field(0.9999, gt=0, lt=1, description="decay per optimiser step")
    every: int = Field(
        1, ge=1, description="update every N optimiser steps, with decay**N (same averaging horizon, "
                             "1/N of the cost)")
    warmup: bool = Field(
        True, description="TensorFlow's num_updates rule: decay at step t is min(decay, (1+t)/(10+t)), "
                          "so the early average is not dominated by the initial weights")


class OptimConfig(_Section):
    """Optimiser and learning-rate schedule (mapped into the DeepSpeed JSON; rmsprop and the cosine
    schedule are built by condmoe.trainer.optim and handed to DeepSpeed)."""

    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = Field(
        "adamw", description="optimiser; rmsprop is TensorFlow's (the MobileNet/EfficientNet recipe: "
                             "mean square starts at 1, eps inside the square root, lr inside momentum)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled (adamw) or L2 weight decay")
    no_decay_norm_bias: bool = Field(
        True, description="no weight decay on norm layers' weights and on biases (and other 1-D params); "
                          "only matters when weight_decay > 0")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    momentum: float = Field(0.9, ge=0, description="SGD and RMSprop momentum")
    nesterov: bool = Field(False, description="SGD: Nesterov momentum (needs momentum > 0)")
    alpha: float = Field(0.9, ge=0, lt=1, description="RMSprop: decay of the mean squared gradient")
    eps: float | None = Field(
        None, gt=0, description="Adam/RMSprop epsilon; None: 1e-8 for Adam, 1e-3 for RMSprop "
                                "(TensorFlow's, added inside the square root)")
    steps: int = Field(100, ge=1, description="optimiser steps to train in total")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps from 0 to lr")
    schedule: Literal["constant", "warmup", "warmup_decay", "cosine"] = Field(
        "warmup", description="constant lr; linear warm-up then constant; warm-up then linear decay; "
                              "warm-up then cosine decay to min_lr at the last step")
    min_lr: float = Field(0.0, ge=0, description="cosine schedule: the lr it decays to (< lr)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="label smoothing of the models' classification cross-entropy")
    ema: EmaConfig = Field(default_factory=EmaConfig)
    grad_accum: int = Field(1, ge=1, description="micro-steps accumulated per optimiser step")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip (0 disables)")
    seed: int = Field(0, description="seed of model initialisation")

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise _field_error("nesterov", f"nesterov needs optimizer sgd with momentum > 0 (optimizer "
                               f"{self.optimizer}, momentum {self.momentum})", self.nesterov)
        if self.schedule == "cosine" and self.min_lr >= self.lr:
            raise _field_error("min_lr", f"min_lr={self.min_lr} must be below lr={self.lr}", self.min_lr)
        return self


class DeepSpeedConfig(_Section):
    """DeepSpeed engine settings beyond the optimiser."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage (hard-routed MoE models support 0-2); on one worker stage 0 runs "
                       "unless zero_on_one_worker is set"
    )
    zero_on_one_worker: bool = Field(
        False, description="keep zero_stage on a single worker (default: stage 0 there: one rank has "
                           "nothing to shard, and ZeRO's flat fp32 copy and gradient buckets cost "
                           "memory and time); offload in `extra` always keeps the stage"
    )
    bf16: bool = Field(
        False, description="bf16 mixed precision: bf16 parameters, activations and inputs, fp32 master "
                           "weights (ZeRO >= 1) and fp32 routing math (routing/precision.py); meant for GPUs")
    torch_adam: bool = Field(
        True, description="use torch's Adam instead of DeepSpeed's fused op (CPU accelerator)"
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="merged key by key into the generated DeepSpeed JSON, last"
    )


class CheckpointConfig(_Section):
    """Sharded checkpoints: when, how many, and whether they are topology-portable."""

    every: int = Field(0, ge=0, description="save every N optimiser steps (0: only at the end)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept; older ones are deleted")
    portable: bool = Field(
        True, description="also store consolidated weights + optimiser state so a run can "
        "resume on a different worker count or ep_size",
    )
    dir: str | None = Field(
        None, description="checkpoint root (default: <storage_path>/<run name>/checkpoints)"
    )


class PrometheusConfig(_Section):
    """The job's Prometheus exporter (condmoe.cluster.metrics)."""

    enabled: bool = Field(True, description="run one exporter per job, fed by rank 0's aggregate")
    host: str = Field("127.0.0.1", description="address the exporter binds (0.0.0.0 on a cluster)")
    port: int = Field(9108, ge=0, le=65535, description="exporter port (0: any free port)")
    every_n_steps: int = Field(1, ge=1, description="push to the exporter at most every N steps")


class MetricsConfig(_Section):
    """Logging, evaluation cadence and sample-key recording."""

    log_every: int = Field(10, ge=1, description="report loss/routing stats every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_batches: int | None = Field(
        None, ge=1, description="evaluate on at most N batches per worker (None: whole split)"
    )
    record_keys: bool = Field(
        False, description="append every trained sample key to <run>/keys/rank*.jsonl"
    )
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)


# glibc malloc: serve large tensors from the heap and keep freed memory for the next step, instead
# of an mmap/munmap pair (and fresh zeroed pages) per activation; ~10% per CPU training step here
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


class ClusterConfig(_Section):
    """Ray placement, storage and fault tolerance."""

    workers: int | tuple[int, int] = Field(
        2, description="training workers (Ray Train ScalingConfig): an int is a fixed size; [min, max] is an "
                       "elastic job that runs on as many workers as fit, from min to max, and resizes when "
                       "nodes leave or join (JobConfig.for_world: ep_size and grad_accum per world size)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl backend (trainer/device.py)")
    gpu_check: bool = Field(
        True, description="with use_gpu: fail before the run starts unless the machine (embedded Ray) or "
                          "the Ray cluster holds cluster.workers GPUs; off for an autoscaling cluster that "
                          "starts its GPU nodes on demand")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker")
    address: str | None = Field(None, description="Ray address; None starts an embedded local Ray")
    storage_path: str = Field(
        "runs", description="run storage root: a path every node sees, or s3://bucket/prefix (checkpoints "
                            "and Ray Train's run state there; logs in storage.local_dir)")
    name: str | None = Field(None, description="run name (default: the job file's stem)")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts allowed (-1: unlimited)")
    timeout_s: float = Field(1800.0, gt=0, description="distributed init/collective timeout")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="further Ray resources each worker needs, over CPU (and GPU), e.g. "
                                          "{trainer: 1} to place one worker per node that offers one")
    preempt_grace_s: float = Field(
        30.0, gt=0, description="seconds from SIGTERM, a node drain notice or a stop of condmoe train until "
                                "the checkpoint at the next step boundary must be committed; past it the worker "
                                "exits and the previous checkpoint stays the latest")
    resize_interval_s: float = Field(
        60.0, ge=0, description="elastic jobs: how often Ray Train checks whether more workers fit "
                                "(a job grows back this long after capacity returns, at most)")
    start_timeout_s: float = Field(
        60.0, gt=0, description="seconds Ray Train waits for the resources of a worker group before it "
                                "retries (an elastic job retries with the workers that fit)")
    env: dict[str, str | int | float] = Field(
        default_factory=dict,
        description="environment variables of the training workers, over condmoe's defaults "
                    "(WORKER_MALLOC_ENV); an empty value leaves that variable unset")

    @field_validator("workers", mode="after")
    @classmethod
    def _check_workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (v, v) if isinstance(v, int) else v
        if low < 1 or high < low:
            raise ValueError(f"workers must be >= 1 or [min, max] with 1 <= min <= max, got {v}")
        return v

    @property
    def elastic(self) -> bool:
        """True for ``workers: [min, max]``."""
        return isinstance(self.workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    def world_sizes(self) -> range:
        """Every worker count the job may run on."""
        return range(self.min_workers, self.max_workers + 1)

    def worker_env(self) -> dict[str, str]:
        """The training workers' environment additions: malloc defaults, then ``env``."""
        merged = {**WORKER_MALLOC_ENV, **{k: str(v) for k, v in self.env.items()}}
        return {k: v for k, v in merged.items() if v != ""}


_CREDENTIAL_KEYS = {"access_key", "secret_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
                    "aws_session_token", "access_key_id", "secret_access_key", "password", "credentials"}


class StorageConfig(_Section):
    """Object storage for ``s3://`` paths (cluster.storage_path, checkpoint.dir, data.path).

    Each field set here is handed to the driver and the workers as the AWS variable it names;
    unset ones leave the environment's. Credentials never go in a job file (they would be
    saved in every checkpoint's config): AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, a named
    ``profile``, or an instance role.
    """

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO, moto) (sets "
                          "AWS_ENDPOINT_URL_S3; None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)")
    region: str | None = Field(None, description="region (sets AWS_REGION; None: AWS_REGION / AWS_DEFAULT_REGION, "
                                                 "else the bucket's own)")
    profile: str | None = Field(None, description="named profile of ~/.aws/credentials or ~/.aws/config "
                                                  "(sets AWS_PROFILE)")
    local_dir: str = Field(
        "runs", description="with an s3:// storage_path: the local folder (on each node) of the run's logs "
                            "(<local_dir>/<run name>/metrics.jsonl, monitor/, keys/); they are copied to "
                            "<storage_path>/<run name>/logs/ at every checkpoint and at the end")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict) and (bad := sorted(k for k in data if str(k).lower() in _CREDENTIAL_KEYS)):
            raise ValueError(f"{bad[0]}: credentials never go in a job file (it is saved with every checkpoint); "
                             "use AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, storage.profile or an instance role")
        return data

    @field_validator("endpoint_url", mode="after")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {v!r}")
        return v

    def env(self) -> dict[str, str]:
        """The AWS variables this section sets (endpoint, region, profile; never credentials)."""
        out = {}
        if self.endpoint_url:
            out.update({k: self.endpoint_url for k in ENDPOINT_ENV})
        if self.region:
            out.update({k: self.region for k in REGION_ENV})
        if self.profile:
            out["AWS_PROFILE"] = self.profile
        return out


class JobConfig(_Section):
    """One training job: the whole tree a job file describes."""

    model: SerializeAsAny[ModelConfig]  # dumped as the family's own class (its typed options)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check(self) -> "JobConfig":
        if self.model.hard_routed and self.deepspeed.zero_stage == 3:
            raise ValueError(
                f"deepspeed.zero_stage=3 is not supported with hard-routed model {self.model.name!r}"
            )
        if self.optim.ema.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError("optim.ema needs deepspeed.zero_stage <= 2 (ZeRO 3 leaves each rank a slice "
                             "of every weight, not the weights to average)")
        if self.model.experts % self.model.ep_size:
            raise ValueError(
                f"model.ep_size={self.model.ep_size} does not divide model.experts={self.model.experts}"
            )
        for world in self.cluster.world_sizes() if self.cluster.elastic else ():
            self.micro_batch(world)  # an elastic job must keep its global batch at every size it may run on
        return self

    @property
    def run_name(self) -> str:
        return self.cluster.name or "job"

    @property
    def remote_storage(self) -> bool:
        """True when cluster.storage_path is an ``s3://`` URL."""
        return is_s3(self.cluster.storage_path)

    @property
    def run_url(self) -> str:
        """<storage_path>/<run name>: Ray Train's experiment directory (an s3:// URL or a local path)."""
        if self.remote_storage:
            return f"{self.cluster.storage_path.rstrip('/')}/{self.run_name}"
        return str(self.run_dir)

    @property
    def run_dir(self) -> Path:
        """The run's local folder (metrics.jsonl, monitor/, keys/): <storage_path>/<run name>, Ray
        Train's experiment directory; with an s3:// storage_path <storage.local_dir>/<run name>."""
        root = self.storage.local_dir if self.remote_storage else self.cluster.storage_path
        return Path(root).expanduser().resolve() / self.run_name

    @property
    def checkpoint_dir(self) -> Path | str:
        """The checkpoint root: a local Path, or an ``s3://`` URL string (trainer/storage.py)."""
        if self.checkpoint.dir:
            d = self.checkpoint.dir
            return d.rstrip("/") if is_s3(d) else Path(d).expanduser().resolve()
        if self.remote_storage:
            return f"{self.run_url}/checkpoints"
        return self.run_dir / "checkpoints"

    def zero_stage_for(self, world_size: int) -> int:
        """The ZeRO stage the engine runs on ``world_size`` workers (see zero_on_one_worker)."""
        ds = self.deepspeed
        zo = ds.extra.get("zero_optimization", {})
        offload = isinstance(zo, dict) and any(k.startswith("offload") for k in zo)
        stage = 0 if world_size == 1 and not ds.zero_on_one_worker and not offload else ds.zero_stage
        # bf16 keeps fp32 master weights only from ZeRO 1 on (DeepSpeed's bf16 at stage 0 has none for
        # the portable checkpoint to read); on one worker stage 1 costs what that fp32 copy costs
        return max(stage, 1) if ds.bf16 else stage

    def micro_batch(self, world_size: int) -> int:
        """Per-worker micro batch: data.batch_size / (world_size * grad_accum), exact.

        An elastic job (``cluster.workers: [min, max]``) keeps one micro batch at every size,
        data.batch_size / (max * optim.grad_accum), and must fit it a whole number of times per worker
        into data.batch_size at ``world_size`` (see :meth:`grad_accum_for`).
        """
        cl, batch = self.cluster, self.data.batch_size
        if cl.elastic:
            top = cl.max_workers * self.optim.grad_accum
            if batch % top:
                raise ConfigError(f"cluster.workers={list(cl.workers)}: data.batch_size={batch} is not divisible "
                                  f"by max workers*grad_accum={top}")
            micro = batch // top
            if batch % (world_size * micro):
                raise ConfigError(f"cluster.workers={list(cl.workers)}: on {world_size} workers data.batch_size="
                                  f"{batch} is not a whole number of micro-batches of {micro} per worker")
            return micro
        denom = world_size * self.optim.grad_accum
        if self.data.batch_size % denom:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by workers*grad_accum={denom}"
            )
        return self.data.batch_size // denom

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-steps per optimiser step on ``world_size`` workers: optim.grad_accum for a fixed size; an
        elastic job takes up the lost workers' share, data.batch_size / (world_size * micro batch), so its
        global batch stays data.batch_size."""
        if not self.cluster.elastic:
            return self.optim.grad_accum
        return self.data.batch_size // (world_size * self.micro_batch(world_size))

    def ep_size_for(self, world_size: int) -> int:
        """The expert-parallel size on ``world_size`` workers: model.ep_size for a fixed size, the
        :func:`elastic_ep_size` rule for an elastic job."""
        if not self.cluster.elastic:
            return self.model.ep_size
        return elastic_ep_size(self.model.experts, self.model.ep_size, world_size)

    def for_world(self, world_size: int) -> "JobConfig":
        """The config one attempt runs on ``world_size`` workers (what the engine, the checkpoint load and the
        loader read): the job itself for a fixed size; for an elastic job a copy fixed at ``world_size``
        with :meth:`ep_size_for` and :meth:`grad_accum_for` applied."""
        if not self.cluster.elastic:
            return self
        if world_size not in self.cluster.world_sizes():
            raise ConfigError(f"cluster.workers={list(self.cluster.workers)}: cannot run on {world_size} workers")
        cfg = self.model_copy(deep=True)
        cfg.optim.grad_accum = self.grad_accum_for(world_size)
        cfg.model.ep_size = self.ep_size_for(world_size)
        cfg.cluster.workers = world_size
        return cfg

    def check_topology(self, world_size: int) -> None:
        """Raise ConfigError when the job cannot run on ``world_size`` workers."""
        self.micro_batch(world_size)
        ep = self.ep_size_for(world_size)
        if self.model.hard_routed and world_size % ep:
            raise ConfigError(
                f"model.ep_size={ep} does not divide the worker count {world_size}"
            )


def elastic_ep_size(experts: int, ep_size: int, world_size: int) -> int:
    """The expert-parallel size an elastic job runs at on ``world_size`` workers: the largest d <= the
    configured ``ep_size`` that divides both ``experts`` and ``world_size`` (1 always does), so every
    worker holds the same number of experts and the expert-parallel groups tile the world."""
    return max(d for d in range(1, ep_size + 1) if experts % d == 0 and world_size % d == 0)


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # the latter: a dataclass's (options)
        msg = f"unknown key {field!r}"
    elif kind == "missing":
        msg = f"missing required field {field!r}"
    elif kind == "value_error":  # a validator's own message names the values; the input is a whole section
        msg = first["msg"].removeprefix("Value error, ")
        msg = msg if field == "<root>" else f"{field}: {msg}"
    elif kind == "config_field":  # _field_error: the message names the value
        msg = f"field {field!r}: {first['msg']}"
    else:
        msg = f"field {field!r}: {first['msg']} (got {first.get('input')!r})"
    more = len(err.errors()) - 1
    return f"{source}: {msg}" + (f" (and {more} more error(s))" if more else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], value); the value is parsed as YAML (1, true, [1,2], null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """Apply ``--set`` overrides to a raw (unvalidated) job dict, in order."""
    for text in overrides or []:
        parts, value = parse_override(text)
        node = tree
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def job_from_dict(tree: dict, *, source: str = "<job>") -> JobConfig:
    """Validate a raw dict into a JobConfig; errors become one-line ConfigErrors."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: a job file must be a YAML mapping, got {type(tree).__name__}")
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job file; the run name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {str(path)!r} not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where} malformed YAML: {problem}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a job file must be a YAML mapping, got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides)
    tree.setdefault("cluster", {})
    if isinstance(tree["cluster"], dict):
        tree["cluster"].setdefault("name", path.stem)
    cfg = job_from_dict(tree, source=str(path))
    return resolve_paths(cfg)


def resolve_paths(cfg: JobConfig, base: Path | None = None) -> JobConfig:
    """Make local data/storage/checkpoint paths absolute (workers may run in another cwd)."""
    base = base or Path.cwd()

    def _abs(p: str) -> str:
        local = local_path(p)  # None for pipe:, scheme:// URLs and shard patterns: kept as written
        if local is None or local.is_absolute():
            return p
        return str((base / local.expanduser()).resolve())

    cfg.data.path = _abs(cfg.data.path)
    cfg.cluster.storage_path = _abs(cfg.cluster.storage_path)
    cfg.storage.local_dir = _abs(cfg.storage.local_dir)
    if cfg.checkpoint.dir:
        cfg.checkpoint.dir = _abs(cfg.checkpoint.dir)
    return cfg


def dump_job(cfg: JobConfig) -> str:
    """The resolved config as YAML (saved with every checkpoint)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def _scheduler(cfg: JobConfig) -> dict | None:
    o = cfg.optim
    if o.schedule in ("constant", "cosine"):  # cosine: condmoe.trainer.optim.CosineSchedule
        return None
    if o.schedule == "warmup":
        return {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                               "warmup_num_steps": max(o.warmup_steps, 1),
                                               "warmup_type": "linear"}}
    return {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                                "warmup_num_steps": max(o.warmup_steps, 1),
                                                "total_num_steps": max(o.steps, o.warmup_steps + 1),
                                                "warmup_type": "linear"}}


def _optimizer(cfg: JobConfig) -> dict | None:
    o = cfg.optim
    if o.optimizer == "rmsprop":  # not in DeepSpeed's JSON: condmoe.trainer.optim.RMSpropTF
        return None
    if o.optimizer == "sgd":
        return {"type": "SGD", "params": {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov,
                                          "weight_decay": o.weight_decay}}
    params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps or 1e-8,
                              "weight_decay": o.weight_decay}
    if cfg.deepspeed.torch_adam:
        params["torch_adam"] = True
    if o.optimizer == "adamw":
        params["adam_w_mode"] = True
        return {"type": "AdamW", "params": params}
    params["adam_w_mode"] = False
    return {"type": "Adam", "params": params}


def deepspeed_config(cfg: JobConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for ``world_size`` workers, generated from the job config."""
    cfg.check_topology(world_size)
    stage = cfg.zero_stage_for(world_size)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch(world_size),
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "fp16": {"enabled": False},
        # bf16: DeepSpeed casts the parameters but keeps buffers fp32 unless told, and torch's batch
        # norm needs its running statistics in its weights' dtype
        **({"data_types": {"buffer_dtype": "bf16"}} if cfg.deepspeed.bf16 else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "seed": cfg.optim.seed,
    }
    optimizer, sched = _optimizer(cfg), _scheduler(cfg)
    if optimizer is not None:
        ds["optimizer"] = optimizer
    if sched is not None:
        ds["scheduler"] = sched
    if stage in (1, 2):
        # expert (MoE) param groups need their own partitions; contiguous grads are fine on CPU
        ds["zero_optimization"].update({"contiguous_gradients": True, "overlap_comm": False})
    if stage > 0 and (cfg.model.hard_routed or cfg.optim.optimizer in ("sgd", "rmsprop")):
        # DeepSpeed lists only Adam-like optimisers as ZeRO-tested; SGD and RMSprop are elementwise
        ds["zero_allow_untested_optimizer"] = True
    return _merge(ds, cfg.deepspeed.extra)


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, nested dicts merged key by key (so a zero_optimization
    option in deepspeed.extra keeps the generated stage)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
