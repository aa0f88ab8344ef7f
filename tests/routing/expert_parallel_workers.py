"""Worker side of the multi-process expert-parallel tests (imported by spawned children).

Each scenario builds the layer / model at ep_size=2 after deepspeed.init_distributed("gloo"),
loads the single-process (ep_size=1) reference weights, runs this rank's half of the batch
and saves outputs, gradients and stats for the parent to compare.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from condmoe.trainer.engine import free_port

EXPERT_KEY = re.compile(r"deepspeed_experts\.(\d+)\.")


def run_ranks(fn, args: tuple, world_size: int = 2, timeout: float = 180.0) -> None:
    """Spawn ``fn(rank, world_size, port, *args)`` on ``world_size`` processes; a child's error or a
    hang past ``timeout`` seconds raises here (children are killed), so a test never hangs."""
    port = free_port()
    ctx = mp.start_processes(fn, args=(world_size, port, *args), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert-parallel workers did not finish within {timeout}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size))
    torch.set_num_threads(1)
    import deepspeed

    from condmoe.trainer.ds_ops import load_ops


    load_ops()  # clears a build lock left by a killed process

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def localise(state: dict[str, torch.Tensor], rank: int, n_local: int) -> dict[str, torch.Tensor]:
    """ep_size=1 state dict -> this rank's: keep its experts, renumber global -> local ids."""
    out = {}
    for key, value in state.items():
        m = EXPERT_KEY.search(key)
        if m is None:
            out[key] = value
            continue
        g = int(m.group(1))
        if g // n_local == rank:
            out[key[: m.start(1)] + str(g - rank * n_local) + key[m.end(1):]] = value
    return out


def globalise(name: str, rank: int, n_local: int) -> str:
    """Local parameter name -> the ep_size=1 name."""
    m = EXPERT_KEY.search(name)
    if m is None:
        return name
    return name[: m.start(1)] + str(int(m.group(1)) + rank * n_local) + name[m.end(1):]


def topk_worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    init_gloo(rank, world_size, port)
    from condmoe.routing.models.topk_moe_cnn import conv_expert
    from condmoe.routing.topk_moe import ImageExpert, TopKMoE

    spec = torch.load(Path(workdir) / "topk_spec.pt")
    results = {}
    for case in spec["cases"]:
        torch.manual_seed(0)
        shape = spec["shape"]
        layer = TopKMoE(shape[0] * shape[1] * shape[2], ImageExpert(conv_expert(shape[0]), shape), 4,
                        ep_size=world_size, **case["kwargs"])
        layer.load_state_dict(localise(case["state"], rank, layer.num_experts // world_size))
        b = case["x"].shape[0] // world_size
        x = case["x"][rank * b : (rank + 1) * b].clone().requires_grad_(True)
        y, routing = layer(x)
        (y * case["w"][rank * b : (rank + 1) * b]).sum().backward()
        n_local = layer.num_experts // world_size
        grads = {globalise(n, rank, n_local): p.grad.clone() for n, p in layer.named_parameters()
                 if p.grad is not None}
        results[case["name"]] = {"y": y.detach(), "x_grad": x.grad, "grads": grads,
                                 "stats": routing.stats.as_dict(), "local_stats": layer.last_stats.as_dict(),
                                 "capacity": layer.capacity(b)}
    torch.save(results, Path(workdir) / f"topk_rank{rank}.pt")


def coe_worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    init_gloo(rank, world_size, port)
    from condmoe.routing import build_model, collect_routing_stats

    spec = torch.load(Path(workdir) / "coe_spec.pt")
    torch.manual_seed(0)
    model = build_model("coe_cnn", "tiny", ep_size=world_size, **spec["options"])
    n_local = model.experts.num_local_experts
    model.load_state_dict(localise(spec["state"], rank, n_local))
    b = spec["x"].shape[0] // world_size
    x, y = spec["x"][rank * b : (rank + 1) * b], spec["y"][rank * b : (rank + 1) * b]
    results = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        model.zero_grad(set_to_none=True)
        out = model(x, y)
        out.loss.backward()
        grads = {globalise(n, rank, n_local): p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        results[mode] = {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads,
                         "stats": collect_routing_stats(model)["root"].as_dict(),
                         "group_stats": model.last_group_stats.as_dict()}
    torch.save(results, Path(workdir) / f"coe_rank{rank}.pt")


def engine_worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    """Train topk_moe_cnn, coe_cnn (ep_size=2) and cigt_lenet for a few steps with a DeepSpeed engine, ZeRO 2."""
    init_gloo(rank, world_size, port)
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from condmoe.routing import build_model

    results = {}
    cases = (("topk_moe_cnn", dict(k=2, ep_size=world_size)), ("coe_cnn", dict(dropout=0.0, ep_size=world_size)),
             ("cigt_lenet", dict(warmup_steps=2)))  # CIGT: plain data parallel, ranks route differently
    for name, opts in cases:
        torch.manual_seed(0)
        model = build_model(name, "tiny", experts=4, **opts)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in model.parameters() if p.requires_grad], "name": "params"})
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
        config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**6}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        losses = []
        for _ in range(4):
            out = engine(x, y)
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss))
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        restored = None
        if name == "coe_cnn":  # our own expert container; top-k is DeepSpeed's MoE layer itself
            restored = _checkpoint_round_trip(engine, name, opts, config, params, world_size, workdir)
        results[name] = {"losses": losses, "params": params, "restored": restored}
    torch.save(results, Path(workdir) / f"engine_rank{rank}.pt")


def _checkpoint_round_trip(engine, name, opts, config, params, world_size, workdir) -> bool:
    """DeepSpeed's MoE checkpoint layout (one file per global expert) restores our experts."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from condmoe.routing import build_model

    ckpt = Path(workdir) / f"ckpt_{name}"
    engine.save_checkpoint(str(ckpt), tag="t")
    torch.manual_seed(1)
    fresh = build_model(name, "tiny", experts=4, **opts)
    fresh_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in fresh.parameters() if p.requires_grad], "name": "params"})
    engine2, _, _, _ = deepspeed.initialize(model=fresh, optimizer=torch.optim.SGD(fresh_groups, lr=0.05),
                                            config=config)
    engine2.load_checkpoint(str(ckpt), tag="t", load_optimizer_states=False)
    return all(torch.equal(p, params[n]) for n, p in engine2.module.named_parameters())
