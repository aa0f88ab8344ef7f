"""DeepSpeed's side of a checkpoint: sharded files, portable state, re-sharding.

``save_state(engine, dir)`` writes, into a directory the caller commits
(trainer/checkpoint.py)::

    ds/...            DeepSpeed's sharded files (model, ZeRO optimiser, expert shards)
    portable/         the portable state, sharded: each rank's fp32 weights + optimiser
                      state slices by GLOBAL name (trainer/sharded_state.py)

and returns the topology that goes into meta.json (world size, ZeRO stage,
``portable``, ``portable_format``). ``load_state`` takes DeepSpeed's own
sharded load when the world size, ``ep_size`` and ZeRO stage all match the
checkpoint's; otherwise (which DeepSpeed cannot do for MoE checkpoints with
optimiser state, deepspeed issue #5716) it restores the portable state: each
rank reads the slices of every parameter's fp32 value and Adam/SGD state that
its new ZeRO partition (and its experts, renamed from global to local ids)
needs, straight into DeepSpeed's partitions.

Checkpoints written before the sharded form (meta.json without
``portable_format``, or ``"file"``) hold ``portable.pt``: the whole state
consolidated on rank 0 (``consolidate``), restored by setting full values
through DeepSpeed's tensor-fragment API (``restore_portable``). They still
load; ``save_state(..., portable_format="file")`` still writes one.

portable.pt holds only tensors, numbers, strings and lists/dicts of them, so
it is read with ``torch.load(weights_only=True)``: a file holding any other
pickled object is refused, never executed. The sharded form has no pickle
but DCP's weights-only tensor files and a checked JSON index (see
trainer/dcp_slices.py). (DeepSpeed reads its own ds/ files with
``weights_only=False``.)
"""

from __future__ import annotations

import json
import logging
import numbers
import pickle
import re
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")
# optimiser state per parameter: Adam/AdamW, SGD, RMSprop (torch's and condmoe.trainer.optim.RMSpropTF)
OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "square_avg")
PORTABLE = "portable.pt"
PORTABLE_FORMATS = ("sharded", "file")  # meta.json's portable_format: portable/ (sharded_state.py), portable.pt


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------- save / load
def save_state(engine, directory: Path, *, portable: bool = True, portable_format: str = "sharded") -> dict:
    """Write the engine's state into ``directory`` (collective); returns meta.json's topology.

    portable_format: "sharded" (each rank writes its slices) or "file" (portable.pt, gathered on rank 0).
    """
    if portable_format not in PORTABLE_FORMATS:
        raise ValueError(f"portable_format must be one of {PORTABLE_FORMATS}, got {portable_format!r}")
    engine.save_checkpoint(str(directory), tag="ds", save_latest=False)
    if portable and portable_format == "sharded":
        from .sharded_state import SHARDED_DIR, save_sharded  # it builds on this module's helpers

        save_sharded(engine, directory / SHARDED_DIR)
    elif portable:
        state = consolidate(engine)
        if state is not None:  # rank 0 only
            torch.save(storable(state), directory / PORTABLE)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"world_size": world, "zero_stage": engine.zero_optimization_stage(), "portable": portable,
            **({"portable_format": portable_format} if portable else {})}


def load_state(engine, directory: Path, meta: dict, *, world_size: int, ep_size: int) -> None:
    """Restore the engine from ``directory`` (every rank), saved with ``meta``.

    Same topology: DeepSpeed's own sharded load. Different worker count,
    ep_size or ZeRO stage: the portable state, re-sharded here.
    """
    saved_stage = _saved_zero_stage(meta)
    stage = engine.zero_optimization_stage()
    saved = (meta["world_size"], meta.get("ep_size", 1), saved_stage)
    if saved == (world_size, ep_size, stage):
        path, _ = engine.load_checkpoint(str(directory), tag="ds", load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {directory / 'ds'}")
    else:
        if not meta.get("portable"):
            raise ValueError(
                f"checkpoint {directory} was saved on {saved[0]} workers (ep {saved[1]}, ZeRO "
                f"{saved_stage}) without checkpoint.portable; it can only resume on that topology, "
                f"not {world_size} (ep {ep_size}, ZeRO {stage})")
        fmt = meta.get("portable_format", "file")  # checkpoints from before the sharded form: portable.pt
        if fmt == "sharded":
            from .sharded_state import SHARDED_DIR, restore_sharded

            restore_sharded(engine, directory / SHARDED_DIR)
        elif fmt == "file":
            restore_portable(engine, load_portable(directory / PORTABLE))
        else:
            raise ValueError(f"checkpoint {directory}: unknown portable_format {fmt!r} "
                             f"(this condmoe reads {', '.join(PORTABLE_FORMATS)})")
        log.info("re-sharded checkpoint %s (%s portable state): world %d -> %d, ep %d -> %d, ZeRO %s -> %d",
                 directory, fmt, saved[0], world_size, saved[1], ep_size, saved_stage, stage)
    engine.global_steps = int(meta["step"])
    engine.global_samples = int(meta.get("samples", 0))


def read_portable(ckpt: Path) -> dict:
    """A checkpoint's whole portable state, in portable.pt's structure, read in this process alone.

    Either format (tools and tests; a resuming job reads only its slices)::

        {"params": {global name: {"param": tensor, "exp_avg": tensor, ...}}, "optim_keys": [str],
         "optim_step": int, "scheduler": dict | None, "buffers": {global name: tensor}}
    """
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    if meta.get("portable_format", "file") == "sharded":
        from .sharded_state import SHARDED_DIR, read_sharded_portable

        return read_sharded_portable(Path(ckpt) / SHARDED_DIR)
    return load_portable(Path(ckpt) / PORTABLE)


def _saved_zero_stage(meta: dict) -> int | None:
    """The ZeRO stage a checkpoint was written at (older ones: from their saved config)."""
    if "zero_stage" in meta:
        return int(meta["zero_stage"])
    try:
        return int(yaml.safe_load(meta["config"])["deepspeed"]["zero_stage"])
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


# ---------------------------------------------------------------- our file format
def storable(value, where: str = "portable state"):
    """``value`` as tensors, numbers, strings, None and lists/dicts of them (tuples -> lists).

    Anything else (an object the next ``torch.load(weights_only=True)`` would
    refuse) is a TypeError naming where it sits.
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, numbers.Integral):  # numpy ints and the like
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [storable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not str or int")
        return {k: storable(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint "
                    "stores only tensors, numbers, strings and lists/dicts of them")


def refused(path: Path, err: pickle.UnpicklingError) -> ValueError:
    """One line for a weights-only load that refused ``path`` (torch's message: several lines on
    how to load it anyway), naming what it would have called."""
    found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(err))
    return ValueError(f"{path}: refused to load: it holds more than tensors, numbers and strings "
                      f"({found.group(0) if found else 'not a weights-only file'})")


def load_portable(path: Path) -> dict:
    """Read portable.pt with ``weights_only=True``; a file holding other objects is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(path, e) from None
    if not isinstance(state, dict) or not {"params", "optim_keys"} <= state.keys():
        raise ValueError(f"{path}: not a condmoe portable state (no 'params'/'optim_keys')")
    return state


# ---------------------------------------------------------------- expert naming
def _expert_layout(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{param name: (ep rank, local experts)} for deepspeed.moe expert params."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    out = {}
    for name, p in module.named_parameters():
        if is_moe_param(p) and _EXPERT.match(name):
            ep_group = groups._get_expert_parallel_group(p.group_name)
            ep_rank = dist.get_rank(group=ep_group)
            local = _local_experts(module, name)
            out[name] = (ep_rank, local)
    return out


def _local_experts(module: torch.nn.Module, name: str) -> int:
    prefix = _EXPERT.match(name).group(1).rstrip(".")
    experts = module.get_submodule(prefix)
    return len(experts)


def to_global(name: str, layout: dict[str, tuple[int, int]]) -> str:
    """Local expert param name -> name with the global expert id (unchanged if dense)."""
    if name not in layout:
        return name
    ep_rank, local = layout[name]
    head, idx, tail = _EXPERT.match(name).groups()
    return f"{head}{ep_rank * local + int(idx)}{tail}"


def global_names(module: torch.nn.Module) -> tuple[dict[str, str], set[str]]:
    """({local name: global name}, local names of expert entries) over every parameter AND
    buffer: an expert's buffers (its BatchNorm statistics) get the global expert id too."""
    heads = {_EXPERT.match(n).group(1): where for n, where in _expert_layout(module).items()}
    names, experts = {}, set()
    for name, _ in [*module.named_parameters(), *module.named_buffers()]:
        m = _EXPERT.match(name)
        if m and m.group(1) in heads:
            ep_rank, local = heads[m.group(1)]
            names[name] = f"{m.group(1)}{ep_rank * local + int(m.group(2))}{m.group(3)}"
            experts.add(name)
        else:
            names[name] = name
    return names, experts


# ---------------------------------------------------------------- consolidation
def _zero_opt(engine):
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # (re)link every param's optimiser-state fragments: a group whose state was made
        # after the first link (or restored) would otherwise be missing
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    return opt


def _base_state(engine) -> dict:
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return base.state


def _init_optimizer_state(engine, keys: list[str]) -> None:
    """Create zero optimiser state where a fresh torch optimiser has none yet (lazy init).

    torch's Adam/SGD make their state at the first step; the fragments must
    exist before DeepSpeed can link them to the parameters and we can fill them.
    """
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    # ZeRO 3 steps the torch optimiser on its flat fp32 partitions, not on the groups' params
    flat = getattr(opt, "fp32_partitioned_groups_flat", None)
    tensors = list(flat) if flat is not None else [p for g in base.param_groups for p in g["params"]]
    for p in tensors:
        state = base.state[p]
        if state:
            continue
        for k in keys:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if any(k != "momentum_buffer" for k in keys):  # SGD alone keeps no step count
            state["step"] = torch.tensor(0.0)
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False


def _unsharded(engine) -> bool:
    """True when the torch optimiser holds the parameters themselves (ZeRO 0, fp32).

    Then every rank has the full fp32 value in ``p`` and the optimiser state in
    ``optimizer.state[p]``; DeepSpeed's fragment API (ZeRO >= 1, or bf16) does not apply.
    """
    return engine.zero_optimization_stage() == 0 and not hasattr(engine.optimizer, "optimizer")


def consolidate(engine) -> dict | None:
    """Gather full fp32 weights and optimiser state by global name (collective).

    Returns the portable state on rank 0, None elsewhere::

        {"params": {global name: {"param": tensor, "exp_avg": tensor, ...}},
         "optim_keys": [str], "optim_step": int, "scheduler": dict | None,
         "buffers": {global name: tensor}}

    ZeRO 1-3 and bf16: through DeepSpeed's fragment API; ZeRO 0 in fp32:
    straight from the params.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    plain_params = _unsharded(engine)
    if not plain_params:
        _zero_opt(engine)
    module = engine.module
    layout = _expert_layout(module)
    state = _base_state(engine)
    keys = [k for k in OPTIM_KEYS if any(k in s for s in state.values())]
    dense: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in module.named_parameters():
        full = p if plain_params else safe_get_full_fp32_param(p)
        if full is None:
            raise ValueError(f"parameter {name!r} has no fp32 master copy to checkpoint")
        entry = {"param": full.detach().cpu().clone()}
        for k in keys:
            value = state.get(p, {}).get(k) if plain_params else safe_get_full_optimizer_state(p, k)
            entry[k] = (torch.zeros_like(entry["param"]) if value is None else value.detach().cpu().clone())
        (experts if name in layout else dense)[to_global(name, layout)] = entry
    names, expert_entries = global_names(module)
    buffers = {names[n]: b.detach().cpu().clone() for n, b in module.named_buffers()}
    expert_buffers = {names[n]: buffers.pop(names[n]) for n, _ in module.named_buffers() if n in expert_entries}
    gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [(experts, expert_buffers)]
    if dist.is_initialized():
        dist.all_gather_object(gathered, (experts, expert_buffers))
    if _rank() != 0:
        return None
    params = dict(dense)
    for part, part_buffers in gathered:
        for name, entry in part.items():
            params.setdefault(name, entry)
        for name, b in part_buffers.items():
            buffers.setdefault(name, b)
    step_val = 0
    for s in _base_state(engine).values():
        if "step" in s:
            step_val = int(s["step"])
            break
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return {"params": params, "optim_keys": keys, "optim_step": step_val, "scheduler": sched,
            "buffers": buffers}


def restore_portable(engine, portable: dict) -> None:
    """Set weights and optimiser state from a consolidated checkpoint (every rank).

    Each rank picks its own experts (global id -> local id) and its ZeRO
    fragment of every tensor, so any worker count / ep_size works.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _init_optimizer_state(engine, portable["optim_keys"])
    plain_params = _unsharded(engine)
    if not plain_params:
        _zero_opt(engine)
    state = _base_state(engine)
    module = engine.module
    layout = _expert_layout(module)
    params = portable["params"]
    for name, p in module.named_parameters():
        gname = to_global(name, layout)
        if gname not in params:
            raise ValueError(f"checkpoint has no parameter {gname!r} (model changed?)")
        entry = params[gname]
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO 3: p holds only its partition
        if tuple(entry["param"].shape) != shape:
            raise ValueError(f"parameter {gname!r}: checkpoint shape {tuple(entry['param'].shape)} "
                             f"!= model {shape}")
        with torch.no_grad():
            if not hasattr(p, "ds_id"):
                p.data.copy_(entry["param"].to(p.dtype))
            if plain_params:
                for k in portable["optim_keys"]:
                    state[p][k].copy_(entry[k])
                continue
        safe_set_full_fp32_param(p, entry["param"].to(p.device))
        for k in portable["optim_keys"]:
            safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
    _refresh_zero3_params(engine)
    names, _ = global_names(module)
    for n, b in module.named_buffers():
        if names[n] in portable["buffers"]:
            b.data.copy_(portable["buffers"][names[n]])
    restore_counters(engine, portable["optim_step"], portable["scheduler"])


def restore_counters(engine, optim_step: int, scheduler: dict | None) -> None:
    """Set the optimiser's step count and the lr scheduler's state (either portable form)."""
    for s in _base_state(engine).values():
        if "step" in s:
            s["step"] = (torch.tensor(float(optim_step), dtype=s["step"].dtype,
                                      device=s["step"].device)  # where the optimiser keeps it
                         if torch.is_tensor(s["step"]) else optim_step)
    sched = engine.lr_scheduler
    if scheduler is not None and sched is not None:
        sched.load_state_dict(scheduler)
        if hasattr(sched, "last_batch_iteration"):
            # DeepSpeed schedulers: put the restored iteration's lr into the optimiser groups now
            # (the next optimiser step runs before the scheduler's next step)
            sched.step(sched.last_batch_iteration)


def _refresh_zero3_params(engine) -> None:
    """ZeRO 3: copy the restored fp32 partitions into the partitions forward gathers from.

    DeepSpeed's setter fills only the optimiser's fp32 copy; the module's own
    partitions (and the always-gathered small "persistent" params) would keep
    their fresh-init values until the next optimiser step.
    """
    if engine.zero_optimization_stage() != 3:
        return
    opt = engine.optimizer
    with torch.no_grad():
        for group in range(len(opt.fp16_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(group)
        if opt.persistent_parameters:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
