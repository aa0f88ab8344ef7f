"""Worker side of the 2-GPU expert-parallel tests: ep_size 2 over NCCL == ep_size 1 on one GPU.

Each rank first computes the single-process reference (ep_size 1, whole batch, on its own GPU,
before any process group exists), then joins the cpu:gloo,cuda:nccl group the trainer uses,
builds the same weights at ep_size 2 and runs its half of the batch; it saves the largest
differences (outputs, input gradients, expert loads) for the parent to check.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

EXPERT_KEY = re.compile(r"deepspeed_experts\.(\d+)\.")


def _localise(state: dict, rank: int, n_local: int) -> dict:
    out = {}
    for key, value in state.items():
        m = EXPERT_KEY.search(key)
        if m is None:
            out[key] = value
        elif int(m.group(1)) // n_local == rank:
            out[key[: m.start(1)] + str(int(m.group(1)) - rank * n_local) + key[m.end(1):]] = value
    return out


def _join(rank: int, world: int, port: int) -> None:
    import deepspeed

    from condmoe.trainer.device import GPU_BACKEND

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from condmoe.trainer.ds_ops import load_ops

    load_ops()  # clears a build lock left by a killed process
    deepspeed.init_distributed(dist_backend=GPU_BACKEND, auto_mpi_discovery=False)


def ep_worker(rank: int, world: int, port: int, workdir: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cuda"
    torch.cuda.set_device(rank)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda", rank)
    from condmoe.routing import build_model, collect_routing_stats
    from condmoe.routing.models.topk_moe_cnn import conv_expert
    from condmoe.routing.topk_moe import ImageExpert, TopKMoE

    shape, d = (4, 5, 5), 100
    g = torch.Generator().manual_seed(1)
    x_tok = torch.randn(2 * 24, d, generator=g)
    x_img, y_img = torch.randn(2 * 16, 1, 28, 28, generator=g), torch.randint(0, 10, (2 * 16,), generator=g)

    def topk(ep: int):
        torch.manual_seed(0)
        return TopKMoE(d, ImageExpert(conv_expert(shape[0]), shape), 4, ep_size=ep, k=1, drop_tokens=False,
                       min_capacity=1)

    def coe(ep: int):
        torch.manual_seed(0)
        return build_model("coe_cnn", "tiny", experts=4, norm="group", dropout=0.0, lgm="argmin", seed=7, ep_size=ep)

    ref_topk, ref_coe = topk(1).to(dev), coe(1).to(dev).eval()
    xt = x_tok.clone().to(dev).requires_grad_(True)
    y_ref, routing_ref = ref_topk(xt)
    y_ref.sum().backward()
    with torch.no_grad():
        coe_ref = ref_coe(x_img.to(dev)).logits
    coe_load_ref = collect_routing_stats(ref_coe)["root"].load

    _join(rank, world, port)
    res = {}
    layer = topk(world)
    layer.load_state_dict(_localise(ref_topk.state_dict(), rank, 4 // world))
    layer = layer.to(dev)
    b = x_tok.shape[0] // world
    half = slice(rank * b, (rank + 1) * b)
    xh = x_tok[half].clone().to(dev).requires_grad_(True)
    y, routing = layer(xh)
    y.sum().backward()
    res["topk_y"] = float((y - y_ref[half]).detach().abs().max())
    res["topk_xgrad"] = float((xh.grad - xt.grad[half]).abs().max())
    res["topk_load"] = routing.stats.load.tolist() == routing_ref.stats.load.tolist()

    model = coe(world)
    model.load_state_dict(_localise(ref_coe.state_dict(), rank, 4 // world))
    model = model.to(dev).eval()
    bi = x_img.shape[0] // world
    with torch.no_grad():
        logits = model(x_img[rank * bi : (rank + 1) * bi].to(dev)).logits
    res["coe_logits"] = float((logits - coe_ref[rank * bi : (rank + 1) * bi]).abs().max())
    res["coe_load"] = model.last_group_stats.load.tolist() == coe_load_ref.tolist()
    torch.save(res, Path(workdir) / f"ep_rank{rank}.pt")
