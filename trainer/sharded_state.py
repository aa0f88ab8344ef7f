"""The sharded portable state: each rank writes the slices it owns; a resumed rank reads what it needs.

``save_sharded(engine, dir)`` (collective) writes, through trainer/dcp_slices.py::

    portable/
        __R_0.distcp   rank R's slices of the fp32 weights, optimiser state and buffers
        index.json     rank 0: every slice's place, plus each tensor's shape, the optimiser's
                       keys and step count and the lr scheduler's state

Every tensor is stored FLAT under ``KIND/GLOBAL NAME`` (KIND: ``param``, an
optimiser key such as ``exp_avg``, or ``buffer``; experts by global expert id,
as in portable.pt), as the chunks its owners hold: with ZeRO 1/2 (and the bf16
optimiser) a parameter's fragment of the rank's flat fp32 partition (its
``_hp_mapping``: the lp-fragment offset into the flattened parameter, the
hp-fragment view of the partition and of each optimiser state), with ZeRO 3 the
rank's partition of every parameter (``safe_get_local_fp32_param``, padding
cut), with ZeRO 0 whole tensors spread round robin over the ranks holding a
copy (the data-parallel group; for an expert its expert-data-parallel group),
so every element is written once, by one rank. ``restore_sharded`` describes
the NEW partition the same way (views into the fp32 partitions and optimiser
state, or the parameters themselves at ZeRO 0) and reads only the stored
chunks that overlap it, straight into those views; ZeRO 1/2 then rebuild the
working weights from the fp32 partitions (``update_lp_params``: DeepSpeed's own
all-gather), ZeRO 3 refreshes its partitions. No rank holds more than its share
plus one chunk (benchmarks/ckpt_memory.py measures it).

Why torch.distributed.checkpoint, not DeepSpeed's universal checkpoint: DCP
plans exactly this (per-rank files, chunks with offsets, a load that reads each
overlap of a stored chunk with a wanted one) and runs inside the job.
DeepSpeed 0.19.8's universal format is an offline conversion
(``ds_to_universal.py``: one process that loads every shard with
``weights_only=False``) that handles only its AutoEP experts (it skips the
``layer_*_expert_*`` files of ``deepspeed.moe.layer.MoE``, which condmoe's
experts are) and has no ZeRO 0.
"""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist

from .dcp_slices import Slice, read_full, read_index, read_slices, write_slices
from .ds_checkpoint import (
    _EXPERT,
    OPTIM_KEYS,
    _base_state,
    _init_optimizer_state,
    _refresh_zero3_params,
    _unsharded,
    _zero_opt,
    global_names,
    restore_counters,
    storable,
)

SHARDED_DIR = "portable"


def _holders(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{local name of every parameter and buffer: (this rank's place among the ranks holding a copy, count)}.

    Dense tensors are held by every rank, an expert's by its expert-data-parallel group.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    heads = {}
    for name, p in module.named_parameters():
        m = _EXPERT.match(name)
        if m and is_moe_param(p):
            g = groups._get_expert_data_parallel_group(p.group_name)
            heads[m.group(1)] = (dist.get_rank(group=g), dist.get_world_size(group=g))
    out = {}
    for name, _ in chain(module.named_parameters(), module.named_buffers()):
        m = _EXPERT.match(name)
        out[name] = heads.get(m.group(1), world) if m else world
    return out


def owned_slices(engine, keys: list[str], *, reading: bool) -> tuple[dict[str, Slice], dict[str, list[int]]]:
    """(this rank's slices, {global name: shape}) of the fp32 weights, optimiser state ``keys`` and buffers.

    reading=False: the slices this rank writes (each element by exactly one rank);
    reading=True: the slices its partition needs (a ZeRO 0 rank: everything it holds).
    """
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    module = engine.module
    names, _ = global_names(module)
    holders = _holders(module)
    plain = _unsharded(engine)
    if not plain:
        _zero_opt(engine)  # (re)link every parameter's optimiser-state fragments
    state = _base_state(engine)
    slices: dict[str, Slice] = {}
    shapes: dict[str, list[int]] = {}
    for i, (name, p) in enumerate(module.named_parameters()):
        gname = names[name]
        shape = list(getattr(p, "ds_shape", p.shape))  # ZeRO 3: p holds only its partition
        shapes[gname], numel = shape, math.prod(shape)
        if plain:  # ZeRO 0 in fp32: the torch optimiser steps the parameters themselves
            place, count = holders[name]
            if not reading and i % count != place:
                continue
            parts = {"param": p}
            for k in keys:
                value = state.get(p, {}).get(k)
                parts[k] = value if value is not None else torch.zeros_like(p)
            offset = 0
        elif hasattr(p, "ds_id"):  # ZeRO 3: this rank's partition of every parameter
            local = safe_get_local_fp32_param(p)
            if local is None:
                raise ValueError(f"parameter {name!r} has no fp32 master copy to checkpoint")
            offset = p._z3_optimizer._get_param_partition_rank(p) * local.numel()
            n = min(local.numel(), numel - offset)  # the last partitions are padded
            if n <= 0:
                continue
            parts = {"param": local[:n], **{k: safe_get_local_optimizer_state(p, k)[:n] for k in keys}}
        else:  # ZeRO 1/2 and the bf16 optimiser: this rank's fragment of the flat fp32 partition
            if not hasattr(p, "_hp_mapping"):
                raise ValueError(f"parameter {name!r} has no fp32 master copy to checkpoint")
            frag = p._hp_mapping
            if frag is None:
                continue
            offset = frag.lp_fragment_address.start
            parts = {"param": frag.get_hp_fragment(), **{k: frag.get_hp_fragment(k) for k in keys}}
        for kind, t in parts.items():
            slices[f"{kind}/{gname}"] = Slice(t, offset, numel)
    for i, (name, b) in enumerate(module.named_buffers()):
        place, count = holders[name]
        if reading or i % count == place:
            slices[f"buffer/{names[name]}"] = Slice(b, 0, b.numel())
        shapes[names[name]] = list(b.shape)
    return slices, shapes


def save_sharded(engine, directory: Path) -> None:
    """Write this rank's part of the portable state into ``directory`` (collective)."""
    state = _base_state(engine)
    keys = [k for k in OPTIM_KEYS if any(k in s for s in state.values())]
    slices, shapes = owned_slices(engine, keys, reading=False)
    everyone = [shapes]
    if dist.is_initialized():  # the shapes of experts other ranks hold (names and sizes only)
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(shapes, everyone, dst=0)
    extra = {}
    if everyone is not None:
        step = next((int(s["step"]) for s in state.values() if "step" in s), 0)
        sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        extra = {"optim_keys": keys, "optim_step": step, "scheduler": _json_plain(storable(sched), "scheduler"),
                 "shapes": {n: s for part in everyone for n, s in part.items()}}
    write_slices(directory, slices, extra)


def restore_sharded(engine, directory: Path) -> None:
    """Set weights, optimiser state and buffers from a sharded portable state (every rank).

    Each rank reads only the chunks that overlap its own partition, into it.
    """
    index = read_index(directory)
    keys = index["optim_keys"]
    _init_optimizer_state(engine, keys)
    plain = _unsharded(engine)
    targets, shapes = owned_slices(engine, keys, reading=True)
    problem = None
    for gname, shape in shapes.items():
        saved = index["shapes"].get(gname)
        if saved is None:
            if f"buffer/{gname}" in targets:  # a buffer the checkpoint lacks keeps its value (as from portable.pt)
                targets.pop(f"buffer/{gname}")
                continue
            problem = problem or f"checkpoint has no parameter {gname!r} (model changed?)"
        elif list(saved) != shape:
            problem = problem or f"parameter {gname!r}: checkpoint shape {tuple(saved)} != model {tuple(shape)}"
    _agree(problem)  # every rank raises, or none: a lone raise would leave the others in the next collective
    read_slices(directory, targets, index)
    if engine.zero_optimization_stage() == 3:
        _refresh_zero3_params(engine)
    elif not plain:  # the working (lp) weights from the restored fp32 partitions: DeepSpeed's all-gather
        engine.optimizer.update_lp_params()
    restore_counters(engine, index["optim_step"], index["scheduler"])


def _agree(problem: str | None) -> None:
    """Raise ValueError on every rank when any rank found a ``problem``."""
    found = [problem]
    if dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem)
    first = next((p for p in found if p is not None), None)
    if first is not None:
        raise ValueError(first)


def read_sharded_portable(directory: Path) -> dict:
    """The whole sharded state in portable.pt's structure (one process; tools and tests)."""
    index = read_index(directory)
    full = read_full(directory)
    params: dict[str, dict[str, torch.Tensor]] = {}
    buffers = {}
    for fqn, t in full.items():
        kind, gname = fqn.split("/", 1)
        if kind == "buffer":
            buffers[gname] = t
        else:
            params.setdefault(gname, {})[kind] = t
    return {"params": params, "optim_keys": index["optim_keys"], "optim_step": index["optim_step"],
            "scheduler": index["scheduler"], "buffers": buffers}


def _json_plain(value, where: str):
    """``value`` (already ``storable``) if JSON keeps it as it is: no tensors, string keys only."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{where} holds a tensor; the sharded state's index stores numbers and strings")
    if isinstance(value, list):
        return [_json_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string (JSON would turn it into one)")
        return {k: _json_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    return value
