"""Where one training worker runs, decided in one place: the CPU with gloo, or its own GPU with NCCL.

The job says ``cluster.use_gpu``; the launcher says which GPU is this worker's:

- Ray Train: each worker holds one GPU (``ray.get_gpu_ids()``), and Ray Train
  sets CUDA_VISIBLE_DEVICES to the GPUs of all workers on the node, so that
  NCCL can reach them. ``ray.train.torch.get_device()`` is the position of the
  worker's GPU id in that list; condmoe's Ray entry (cluster/launch.py) passes
  the ids in ``CONDMOE_GPU_IDS`` and :func:`cuda_index` makes the same lookup,
  so the trainer never imports Ray. (LOCAL_RANK alone is not enough there: Ray
  orders a node's workers by GPU id as numbers but lists CUDA_VISIBLE_DEVICES
  as strings, so from 11 GPUs on a node up the two orders differ.)
- ``torchrun``, the ``deepspeed`` launcher, ``python -m condmoe.trainer``:
  LOCAL_RANK (0 when unset) indexes the visible GPUs.
- one visible GPU (a one-GPU pod, CUDA_VISIBLE_DEVICES=3): that one.

On a GPU worker DeepSpeed's accelerator is ``cuda`` (DS_ACCELERATOR, which must
be set before deepspeed is first imported), ``torch.cuda.set_device`` selects
the GPU before the process group exists, and the process group is
``cpu:gloo,cuda:nccl``: every CUDA tensor (gradients, the experts' all-to-all)
goes through NCCL, while the few small CPU tensors the trainer reduces (routing
statistics, evaluation counts, object collectives) go through gloo instead of
each being copied to the GPU and back. On the CPU it is gloo alone, as before.

The model and every batch go to the chosen device: batches from page-locked
(pinned) host memory with non-blocking copies, images in the training dtype
(bfloat16 with ``deepspeed.bf16``) and, with ``model.channels_last``, in the
channels-last memory format, which the convolutions' activations then keep.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import ConfigError, JobConfig

log = logging.getLogger(__name__)

GPU_IDS_ENV = "CONDMOE_GPU_IDS"  # the GPU ids Ray assigned this worker (cluster/launch.py sets it)
CPU_BACKEND = "gloo"
GPU_BACKEND = "cpu:gloo,cuda:nccl"  # NCCL for CUDA tensors, gloo for the small CPU ones


class DeviceError(ConfigError):
    """The job cannot get the device it asks for (no GPU, or not this worker's); one line."""


def accelerator_name(use_gpu: bool) -> str:
    """DeepSpeed's accelerator (the DS_ACCELERATOR value) for a worker: ``cuda`` or ``cpu``."""
    return "cuda" if use_gpu else "cpu"


def process_group_backend(use_gpu: bool) -> str:
    """torch.distributed backend of the job's process group (also Ray Train's TorchConfig backend)."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def cuda_index(*, device_count: int, local_rank: int = 0, visible: str | None = None,
               gpu_ids: str | None = None) -> int:
    """The CUDA device index (as torch numbers the visible GPUs) this worker trains on.

    device_count: GPUs this process sees (``torch.cuda.device_count()``).
    local_rank: the worker's rank on its node (LOCAL_RANK).
    visible: CUDA_VISIBLE_DEVICES (None: unset, every GPU visible in physical order).
    gpu_ids: the GPU ids Ray assigned this worker, comma-separated (CONDMOE_GPU_IDS); when given,
        the index of the first in ``visible``, as ``ray.train.torch.get_device()`` computes it.
    Raises DeviceError (one line) when there is no GPU or none that is this worker's.
    """
    shown = "unset" if visible is None else repr(visible)
    if device_count < 1:
        raise DeviceError(f"cluster.use_gpu is true but this worker sees no CUDA GPU "
                          f"(CUDA_VISIBLE_DEVICES {shown})")
    ids = [i.strip() for i in (gpu_ids or "").split(",") if i.strip()]
    if ids:
        listed = [v.strip() for v in visible.split(",")] if visible and visible != "NoDevFiles" else None
        if listed is None:  # every GPU visible: Ray's ids are the physical indices
            index = int(ids[0]) if ids[0].isdigit() else -1
        else:
            index = listed.index(ids[0]) if ids[0] in listed else -1
        if not 0 <= index < device_count:
            raise DeviceError(f"GPU {ids[0]} assigned to this worker is not among its {device_count} visible "
                              f"GPUs (CUDA_VISIBLE_DEVICES {shown})")
        return index
    if device_count == 1:
        return 0
    if not 0 <= local_rank < device_count:
        raise DeviceError(f"LOCAL_RANK={local_rank} but this worker sees {device_count} GPUs "
                          f"(CUDA_VISIBLE_DEVICES {shown}): one GPU per worker")
    return local_rank


@dataclass(frozen=True)
class Placement:
    """Where a worker's model and batches live.

    device: ``cpu`` or ``cuda:N``; backend: the process group's (:func:`process_group_backend`);
    accelerator: DeepSpeed's (``cpu``/``cuda``); dtype: the input dtype (the engine's parameter
    dtype: bfloat16 with ``deepspeed.bf16``, else float32); channels_last: the images' memory
    format (the convolutions' activations follow it).
    """

    device: torch.device
    backend: str
    accelerator: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images (B, C, H, W) on the device, in the training dtype and memory format.

        Non-blocking from pinned memory (the loader pins on GPU workers). On the CPU in float32
        without channels_last it is ``x`` itself, no copy.
        """
        fmt = self.memory_format if x.dim() == 4 else torch.preserve_format
        return x.to(self.device, dtype=self.dtype if x.is_floating_point() else None,
                    non_blocking=self.is_cuda, memory_format=fmt)

    def move(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Any other batch tensor (labels (B,), the valid mask (B,)) on the device, non-blocking."""
        return None if t is None else t.to(self.device, non_blocking=self.is_cuda)

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move ``module`` to the device (in place; parameters keep their identity).

        The weights keep the contiguous format even with ``channels_last``: DeepSpeed views every
        parameter as flat bytes (its broadcast, ZeRO's flat buffers), which a channels-last weight
        is not; a convolution's output follows its channels-last input all the same.
        """
        return module.to(self.device)

    def deepspeed_args(self):
        """``deepspeed.initialize(args=...)``: DeepSpeed would otherwise take cuda:LOCAL_RANK."""
        if not self.is_cuda:
            return None
        from types import SimpleNamespace

        return SimpleNamespace(device_rank=self.device.index)


def decide_placement(cfg: JobConfig, *, env: Mapping[str, str] | None = None,
                     device_count: int | None = None) -> Placement:
    """The worker's Placement from the job and the launcher's environment (no side effects).

    env: the environment to read (default os.environ); device_count: GPUs visible (default
    ``torch.cuda.device_count()``, read only when ``cluster.use_gpu``). Raises DeviceError.
    """
    env = os.environ if env is None else env
    use_gpu = cfg.cluster.use_gpu
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    common = {"backend": process_group_backend(use_gpu), "accelerator": accelerator_name(use_gpu),
              "dtype": dtype, "channels_last": cfg.model.channels_last}
    if not use_gpu:
        return Placement(device=torch.device("cpu"), **common)
    if device_count is None:
        if not torch.cuda.is_available():
            raise DeviceError(no_cuda_message())
        device_count = torch.cuda.device_count()
    index = cuda_index(device_count=device_count, local_rank=int(env.get("LOCAL_RANK", "0") or 0),
                       visible=env.get("CUDA_VISIBLE_DEVICES"), gpu_ids=env.get(GPU_IDS_ENV))
    return Placement(device=torch.device("cuda", index), **common)


def no_cuda_message() -> str:
    """Why this machine cannot run a ``use_gpu`` job, in one line."""
    build = "" if torch.version.cuda else f" (torch {torch.__version__} is a build without CUDA)"
    return (f"cluster.use_gpu is true but this machine has no usable CUDA GPU{build}: run on a GPU machine, "
            "pass --address of a Ray cluster with GPU workers, or set cluster.use_gpu=false")


def activate(placement: Placement) -> None:
    """Make this process use ``placement``: DeepSpeed's accelerator and the current CUDA device.

    Call before torch.distributed and DeepSpeed start. Raises RuntimeError when DeepSpeed was
    already imported with another accelerator (it reads DS_ACCELERATOR once, at its import).
    """
    before = os.environ.get("DS_ACCELERATOR")
    if before and before != placement.accelerator:
        log.info("DS_ACCELERATOR=%s replaced by %s (cluster.use_gpu decides)", before, placement.accelerator)
    os.environ["DS_ACCELERATOR"] = placement.accelerator
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != placement.accelerator:
            raise RuntimeError(f"DeepSpeed was imported with its {name!r} accelerator before the job chose "
                               f"{placement.accelerator!r}: set DS_ACCELERATOR={placement.accelerator} "
                               "before the process imports deepspeed")
    if placement.is_cuda:
        torch.cuda.set_device(placement.device)


def placement_of(engine) -> Placement:
    """The Placement ``build_engine`` attached to ``engine`` (else: the CPU in float32)."""
    found = getattr(engine, "condmoe_placement", None)
    return found if found is not None else Placement(torch.device("cpu"), CPU_BACKEND, "cpu")


def require_local_gpus(workers: int, *, available: bool | None = None, count: int | None = None) -> None:
    """Preflight without a Ray address (the embedded local Ray): this machine must hold ``workers`` GPUs.

    available / count: injected for tests (default: torch.cuda.is_available() / device_count()).
    """
    available = torch.cuda.is_available() if available is None else available
    if not available:
        raise DeviceError(no_cuda_message())
    count = torch.cuda.device_count() if count is None else count
    if count < workers:
        raise DeviceError(f"cluster.use_gpu needs one GPU per worker: cluster.workers={workers} but this "
                          f"machine has {count} GPU{'s' if count != 1 else ''}")


def require_cluster_gpus(workers: int, resources: Mapping[str, float], where: str) -> None:
    """After connecting to Ray: its cluster must hold ``workers`` GPUs (``ray.cluster_resources()``)."""
    gpus = float(resources.get("GPU", 0) or 0)
    if gpus < workers:
        raise DeviceError(f"cluster.use_gpu needs one GPU per worker: cluster.workers={workers} but the Ray "
                          f"cluster at {where} has {gpus:g} GPUs (an autoscaling cluster that starts GPU "
                          "nodes on demand: set cluster.gpu_check=false)")
