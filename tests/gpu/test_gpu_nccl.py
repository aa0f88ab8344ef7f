"""Expert parallelism over NCCL on two GPUs (marker gpu; skipped with fewer than 2 GPUs).

Top-k MoE (DeepSpeed's all-to-all) and CoE (our expert container's uneven all-to-all) at
ep_size 2, one GPU per rank, against the same weights at ep_size 1 on one GPU: outputs and
input gradients to 1e-4 absolute (TF32 off), expert loads summed over the group exactly.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from gpu_testlib import gpu_count

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc,
              pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")]


def test_expert_all_to_all_over_nccl_matches_one_gpu(tmp_path):
    from condmoe.trainer.engine import free_port
    from nccl_workers import ep_worker

    ctx = mp.start_processes(ep_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    try:
        while not ctx.join(timeout=1.0):
            assert time.monotonic() < deadline, "NCCL workers did not finish in 300 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in range(2):
        res = torch.load(tmp_path / f"ep_rank{rank}.pt")
        assert res["topk_y"] <= 1e-4 and res["topk_xgrad"] <= 1e-4 and res["topk_load"], res
        assert res["coe_logits"] <= 1e-4 and res["coe_load"], res
