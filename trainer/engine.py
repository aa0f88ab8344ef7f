"""Build the DeepSpeed engine of a job: model from the registry, parallelism, initialize last.

The order follows torchtitan: build the model, apply parallelism with
``apply_*`` functions that change it in place, then hand it to
``deepspeed.initialize``. Soft-routed models (CondConv, BasisNet) are plain
data parallel with ZeRO-sharded optimiser state; hard-routed ones (CoE, CIGT,
top-k MoE) hold ``deepspeed.moe`` layers whose experts are spread over an
expert-parallel group of ``ep_size`` workers, and their expert parameters get
their own optimiser groups (DeepSpeed reduces them over the expert-data-parallel
group only).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, JobConfig, deepspeed_config
from .device import activate, decide_placement
from .optim import client_optimizer, client_scheduler, param_groups

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; a race is possible)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: JobConfig) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size).

    Under Ray Train or the ``deepspeed`` launcher the process group or the
    RANK/WORLD_SIZE/MASTER_* variables already exist; a bare single process
    gets a world of one on 127.0.0.1. The device, DeepSpeed's accelerator and the backend
    (``cpu:gloo,cuda:nccl`` with GPUs, gloo on CPU) come from trainer/device.py, set before
    deepspeed is imported; raises DeviceError (a ConfigError) when the job's GPU is missing.
    """
    placement = decide_placement(cfg)
    activate(placement)
    import deepspeed

    from .ds_ops import load_ops

    load_ops()  # before DeepSpeed loads them: a lock file left by a killed process is cleared
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend=placement.backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=cfg.cluster.timeout_s))
    return dist.get_rank(), dist.get_world_size()


def build_model(cfg: JobConfig) -> nn.Module:
    """The job's network from condmoe.routing's registry (seeded: same init on every rank)."""
    from condmoe.routing import build_model as registry_build

    torch.manual_seed(cfg.optim.seed)
    return registry_build(cfg.model.name, cfg.model.size, **cfg.model.build_kwargs(),
                          label_smoothing=cfg.optim.label_smoothing)


def check_model(cfg: JobConfig, world_size: int) -> None:
    """Build the job's model here, before Ray starts, so what only its builder can reject fails now.

    Raises a one-line ConfigError for a bad option value (a CoE ``lgm``, CIGT ``paths`` that
    disagree with ``experts``, a top-k ``k`` above ``experts``, ...) and for experts / ep_size /
    ``world_size`` that do not divide. The build runs on CPU, seeded, the global RNG left as it
    was. Not on the meta device: CoE draws its expert seed from a tensor value, and meta's first
    ``normal_`` init costs ~2 s of CPU per process, more than the CPU build of any registered
    family (0.02 s for condconv_cnn/small, ~1.7 s for the 127M-parameter condconv_mobilenet_v1).
    An expert-parallel build needs torch.distributed's process groups, so the ep_size rules are
    checked without building and the model is built with ep_size 1.
    """
    from condmoe.routing import build_model as registry_build

    m = cfg.model
    if m.experts % m.ep_size:
        raise ConfigError(f"model.ep_size={m.ep_size} does not divide model.experts={m.experts}")
    cfg.check_topology(world_size)
    had_accelerator = "DS_ACCELERATOR" in os.environ
    # deepspeed.moe's first import must not probe for (or warn about) a GPU; the variable is
    # set only meanwhile, so Ray workers started from this process do not inherit it
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.optim.seed)
            registry_build(m.name, m.size, **{**m.build_kwargs(), "ep_size": 1})
    except (ValueError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model {m.name!r} (size {m.size!r}) cannot be built: {first}") from err
    finally:
        if not had_accelerator:
            os.environ.pop("DS_ACCELERATOR", None)


def has_moe_params(model: nn.Module) -> bool:
    """True when the model holds deepspeed.moe expert parameters."""
    from deepspeed.moe.utils import is_moe_param

    return any(is_moe_param(p) for p in model.parameters())


def apply_threads(cfg: JobConfig) -> None:
    """Pin torch's intra-op threads to the CPUs Ray reserved for this worker."""
    torch.set_num_threads(cfg.cluster.threads_per_worker)


def apply_expert_parallel(model: nn.Module, cfg: JobConfig, world_size: int) -> None:
    """Check the model's expert-parallel layout against the job and the world.

    The experts were already placed by the builder (``ep_size`` option); the
    process groups are created by DeepSpeed at initialize. Raises ValueError
    when the layout cannot run on ``world_size`` workers.
    """
    if not cfg.model.hard_routed:
        return
    if world_size % cfg.model.ep_size:
        raise ValueError(f"model.ep_size={cfg.model.ep_size} does not divide world size {world_size}")
    if cfg.model.ep_size > 1 and not has_moe_params(model):
        raise ValueError(
            f"model {cfg.model.name!r} has no deepspeed.moe experts, so ep_size="
            f"{cfg.model.ep_size} cannot place them"
        )


def build_engine(cfg: JobConfig, world_size: int):
    """Build model, apply parallelism, then ``deepspeed.initialize``; returns the engine.

    The engine's forward is the model's: ``engine(x: (B, C, H, W), targets: (B,))``
    returns a ModelOutput.
    """
    import deepspeed

    apply_threads(cfg)
    model = build_model(cfg)
    apply_expert_parallel(model, cfg, world_size)
    placement = decide_placement(cfg)
    placement.model(model)  # this worker's device (and memory format) before DeepSpeed wraps it
    ds_config = deepspeed_config(cfg, world_size)
    # rmsprop and the cosine schedule are ours (trainer/optim.py); the rest comes from ds_config
    engine, _, _, _ = deepspeed.initialize(args=placement.deepspeed_args(), model=model,
                                           model_parameters=param_groups(model, cfg),
                                           optimizer=client_optimizer(cfg),
                                           lr_scheduler=client_scheduler(cfg), config=ds_config)
    engine.condmoe_placement = placement  # the loop and evaluation move batches with it
    log.info("device %s (DeepSpeed accelerator %s, %s, inputs %s%s)", engine.device, placement.accelerator,
             placement.backend, str(placement.dtype).removeprefix("torch."),
             ", channels_last" if placement.channels_last else "")
    stage = engine.zero_optimization_stage()
    if world_size == 1 and stage == 0 and not cfg.deepspeed.bf16:
        # one rank: DeepSpeed would still flatten, all-reduce and copy back every gradient
        engine.enable_backward_allreduce = False
    n_params = sum(p.numel() for p in model.parameters())
    log.info("engine: %s/%s, %d params on this rank, ZeRO %d%s, world %d, ep %d", cfg.model.name,
             cfg.model.size, n_params, stage,
             f" (configured {cfg.deepspeed.zero_stage}: nothing to shard on one worker)"
             if stage != cfg.deepspeed.zero_stage else "", world_size, cfg.model.ep_size)
    return engine
