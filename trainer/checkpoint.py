"""Sharded checkpoints: DeepSpeed's files + data position + routing totals + the config.

Layout under the checkpoint root::

    step-00000200/
        ds/...            DeepSpeed's sharded files (model, ZeRO optimiser, expert shards)
        portable.pt       consolidated fp32 weights + optimiser state, experts by GLOBAL id
        meta.json         step, topology, data position, routing totals, resolved config

A checkpoint is written into ``.tmp-step-N``, fsynced, then renamed: a crash
while writing leaves the previous checkpoint the latest (a dot-dir is never
chosen). The last ``keep_last`` are kept.

Resuming on a different worker count or ``ep_size`` (which DeepSpeed cannot
do for MoE checkpoints with optimiser state, deepspeed issue #5716) loads
``portable.pt``: every parameter's full fp32 value and Adam/SGD state is set
back through DeepSpeed's tensor-fragment API, which re-shards it over the new
ZeRO partitions; expert parameters are renamed from global expert ids to the
new rank's local ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_EXPERT = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")
OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (renamed and holding meta.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a checkpoint root, or a run dir (holding checkpoints/) -> checkpoint dir."""
    path = Path(path).expanduser().resolve()
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint found at {str(path)!r}")


def read_meta(ckpt: str | Path) -> dict:
    """meta.json of a checkpoint."""
    return json.loads((Path(ckpt) / "meta.json").read_text())


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
        if keys and k != "momentum_buffer":
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

    Returns the portable state on rank 0, None elsewhere. ZeRO 1-3 and bf16:
    through DeepSpeed's fragment API; ZeRO 0 in fp32: straight from the params.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    plain = _unsharded(engine)
    if not plain:
        _zero_opt(engine)
    module = engine.module
    layout = _expert_layout(module)
    state = _base_state(engine)
    keys = [k for k in OPTIM_KEYS if any(k in s for s in state.values())]
    dense: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in module.named_parameters():
        full = p if plain else safe_get_full_fp32_param(p)
        if full is None:
            raise ValueError(f"parameter {name!r} has no fp32 master copy to checkpoint")
        entry = {"param": full.detach().cpu().clone()}
        for k in keys:
            value = state.get(p, {}).get(k) if plain else safe_get_full_optimizer_state(p, k)
            entry[k] = (torch.zeros_like(entry["param"]) if value is None else value.detach().cpu().clone())
        (experts if name in layout else dense)[to_global(name, layout)] = entry
    gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [experts]
    if dist.is_initialized():
        dist.all_gather_object(gathered, experts)
    if _rank() != 0:
        return None
    params = dict(dense)
    for part in gathered:
        for name, entry in part.items():
            params.setdefault(name, entry)
    step_val = 0
    for s in _base_state(engine).values():
        if "step" in s:
            step_val = int(s["step"])
            break
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    buffers = {n: b.detach().cpu().clone() for n, b in module.named_buffers()}
    return {"params": params, "optim_keys": keys, "optim_step": step_val, "scheduler": sched,
            "buffers": buffers}


def restore_portable(engine, portable: dict) -> None:
    """Set weights and optimiser state from a consolidated checkpoint (every rank).

    Each rank picks its own experts (global id -> local id) and its ZeRO
    fragment of every tensor, so any worker count / ep_size works.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _init_optimizer_state(engine, portable["optim_keys"])
    plain = _unsharded(engine)
    if not plain:
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
            if plain:
                for k in portable["optim_keys"]:
                    state[p][k].copy_(entry[k])
                continue
        safe_set_full_fp32_param(p, entry["param"].to(p.device))
        for k in portable["optim_keys"]:
            safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
    _refresh_zero3_params(engine)
    for n, b in module.named_buffers():
        if n in portable["buffers"]:
            b.data.copy_(portable["buffers"][n])
    for s in _base_state(engine).values():
        if "step" in s:
            s["step"] = (torch.tensor(float(portable["optim_step"]), dtype=s["step"].dtype)
                         if torch.is_tensor(s["step"]) else portable["optim_step"])
    sched = engine.lr_scheduler
    if portable["scheduler"] is not None and sched is not None:
        sched.load_state_dict(portable["scheduler"])
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


def _saved_zero_stage(meta: dict) -> int | None:
    """The ZeRO stage a checkpoint was written at (older ones: from their saved config)."""
    if "zero_stage" in meta:
        return int(meta["zero_stage"])
    try:
        return int(yaml.safe_load(meta["config"])["deepspeed"]["zero_stage"])
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


# ---------------------------------------------------------------- manager
class CheckpointManager:
    """save(step)/load() of one run's checkpoints under ``root`` (collective calls)."""

    def __init__(self, root: str | Path, *, keep_last: int = 3, portable: bool = True) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.portable = portable

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, engine, step: int, meta: dict,
             before_commit: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint ``step`` atomically; returns its final path (on every rank).

        meta: JSON-serialisable extras (data position, routing totals, config)
        written by rank 0. ``before_commit(tmp_dir)`` runs on rank 0 after every
        file is durable and before the rename (tests kill the process there).
        """
        rank = _rank()
        tmp = self.root / f".tmp-step-{step:08d}"
        final = self.root / f"step-{step:08d}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        engine.save_checkpoint(str(tmp), tag="ds", client_state={"condmoe_step": step},
                               save_latest=False)
        portable = consolidate(engine) if self.portable else None
        _barrier()
        if rank == 0:
            if portable is not None:
                torch.save(portable, tmp / "portable.pt")
            world = dist.get_world_size() if dist.is_initialized() else 1
            full_meta = {"step": step, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
                         "portable": portable is not None, **meta}
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, default=str))
            _fsync_tree(tmp)
            if before_commit is not None:
                before_commit(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        log.info("checkpoint step %d -> %s", step, final)
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, ckpt: str | Path, *, world_size: int, ep_size: int) -> dict:
        """Restore engine state from ``ckpt``; returns its meta dict (every rank).

        Same topology: DeepSpeed's own sharded load. Different worker count,
        ep_size or ZeRO stage: the consolidated portable state, re-sharded here.
        """
        ckpt = Path(ckpt)
        meta = read_meta(ckpt)
        saved_stage = _saved_zero_stage(meta)
        stage = engine.zero_optimization_stage()
        same = (meta["world_size"] == world_size and meta.get("ep_size", 1) == ep_size
                and saved_stage == stage)
        if same:
            path, _ = engine.load_checkpoint(str(ckpt), tag="ds", load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {ckpt / 'ds'}")
        else:
            if not meta.get("portable"):
                raise ValueError(
                    f"checkpoint {ckpt} was saved on {meta['world_size']} workers (ep "
                    f"{meta.get('ep_size', 1)}, ZeRO {saved_stage}) without checkpoint.portable; it can "
                    f"only resume on that topology, not {world_size} (ep {ep_size}, ZeRO {stage})")
            restore_portable(engine, torch.load(ckpt / "portable.pt", weights_only=False))
            log.info("re-sharded checkpoint %s: world %d -> %d, ep %d -> %d, ZeRO %s -> %d", ckpt,
                     meta["world_size"], world_size, meta.get("ep_size", 1), ep_size, saved_stage, stage)
        engine.global_steps = int(meta["step"])
        engine.global_samples = int(meta.get("samples", 0))
        return meta
