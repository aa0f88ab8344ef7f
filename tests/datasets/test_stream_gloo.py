"""Two real ranks (gloo) with a missing shard: one collective per step never hangs, every sample read once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from datetime import timedelta
from pathlib import Path

import pytest

from condmoe.trainer.engine import free_port


def _rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from condmoe.datasets import StreamingLoader

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        ld = StreamingLoader(folder, "train", 16, rank=rank, world_size=world, num_workers=1, seed=5)
        keys, steps = [], 0
        for batch in ld:
            total = torch.tensor([float(batch.labels.numel())])
            dist.all_reduce(total)  # a collective per step, like a gradient all-reduce
            if total.item() != 16 * world:
                raise RuntimeError(f"step {steps}: global batch {total.item()}")
            keys += batch.keys
            steps += 1
        every: list = [None] * world
        dist.all_gather_object(every, {"keys": keys, "steps": steps, "bad": ld.bad_samples, "len": len(ld)})
        if rank == 0:
            Path(out).write_text(json.dumps(every))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_with_a_missing_shard(digits_dir, digits_copy, tmp_path):
    from condmoe.datasets.shardio import read_shard

    (digits_copy / "train-000003.tar").unlink()
    out = tmp_path / "result.json"
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(digits_copy), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = json.loads(out.read_text())
    assert ranks[0]["steps"] == ranks[1]["steps"] == ranks[0]["len"] == 1258 // 32
    real = [k for r in ranks for k in r["keys"] if "#fill" not in k]
    assert len(real) == len(set(real))
    missing = sum(r["bad"].get("missing_shard", 0) for r in ranks)
    assert missing > 0 and len(real) + missing == 39 * 32
    lost = {key for key, _ in read_shard(str(digits_dir / "train-000003.tar")).samples.values()}
    assert len(lost) == 100 and not lost & {k.split("#")[0] for r in ranks for k in r["keys"]}
