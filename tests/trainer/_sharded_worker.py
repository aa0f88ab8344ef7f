"""One rank of a sharded-portable-state check: save (after two steps) or re-sharding load.

usage: python _sharded_worker.py JOB.yaml save|load CKPT_ROOT OUT_PREFIX [OVERRIDE...]
RANK/WORLD_SIZE/MASTER_* from env. Rank r writes OUT_PREFIX.rank{r}.json:
{"owned": {key: [offset, length]}} (save: what it writes; load: what its partition needs) and
{"reads": [[key, offset, length], ...]} (load: every stored range it read, as element offsets)
and "working_weights_restored" (load: the module's parameters equal the restored fp32 values);
rank 0 writes OUT_PREFIX.state.pt: the consolidated state after the save / after the load
(ds_checkpoint.consolidate, the single-file path, as an independent reference).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from condmoe.trainer import dcp_slices, sharded_state  # noqa: E402
from condmoe.trainer.checkpoint import CheckpointManager  # noqa: E402
from condmoe.trainer.config import load_job  # noqa: E402
from condmoe.trainer.ds_checkpoint import OPTIM_KEYS, _base_state, consolidate, storable  # noqa: E402
from condmoe.trainer.engine import build_engine, setup_distributed  # noqa: E402


def _step(engine, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    n = engine.train_micro_batch_size_per_gpu()
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    out = engine(x, y)
    engine.backward(out.loss)
    engine.step()


def _ranges(slices: dict) -> dict:
    return {k: [s.offset, s.tensor.numel()] for k, s in slices.items()}


def main() -> None:
    job, mode, root, out = sys.argv[1:5]
    cfg = load_job(job, sys.argv[5:])
    rank, world = setup_distributed(cfg)
    engine = build_engine(cfg, world)
    mgr = CheckpointManager(root, keep_last=3)
    res: dict = {}
    if mode == "save":
        for s in (1, 2):
            _step(engine, rank, s)
        keys = [k for k in OPTIM_KEYS if any(k in st for st in _base_state(engine).values())]
        res["owned"] = _ranges(sharded_state.owned_slices(engine, keys, reading=False)[0])
        mgr.save(engine, 2, {"ep_size": cfg.model.ep_size, "samples": 64})
    else:
        reads = res["reads"] = []
        plain_read = dcp_slices._Reader.read_data

        def recording(self, plan, planner):
            for item in plan.items:
                start = item.storage_index.offset[0] + item.storage_offsets[0]
                reads.append([item.storage_index.fqn, start, item.lengths[0]])
            return plain_read(self, plan, planner)

        dcp_slices._Reader.read_data = recording
        mgr.load(engine, mgr.latest(), world_size=world, ep_size=cfg.model.ep_size)
        keys = dcp_slices.read_index(mgr.latest() / sharded_state.SHARDED_DIR)["optim_keys"]
        res["owned"] = _ranges(sharded_state.owned_slices(engine, keys, reading=True)[0])
        # the working weights forward uses (ZeRO 1/2: DeepSpeed's lp copies) hold the restored values
        fp32 = [safe_get_full_fp32_param(p) for p in engine.module.parameters()]  # None: p is the fp32 copy
        res["working_weights_restored"] = all(
            f is None or torch.equal(p.detach().float(), f) for p, f in zip(engine.module.parameters(), fp32))
    state = consolidate(engine)
    if rank == 0:
        torch.save(storable(state), f"{out}.state.pt")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(res))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
