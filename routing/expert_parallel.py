"""Hard top-1 dispatch of samples to whole-network experts, spread over workers.

Used by CoE (Zhang, Chen, Zhong, "Collaboration of Experts", ICML 2022,
arXiv 2107.03815): the delegator picks one expert per sample, and only that
expert computes on it. With expert parallelism (``ep_size > 1``) each worker of
the expert-parallel group holds ``num_experts / ep_size`` experts, and samples
travel to the worker holding their expert and back by two variable-size
all-to-alls (no capacity, no padding, nothing dropped: a CoE expert is a whole
network and a sample sent to it must be answered).

The container subclasses ``deepspeed.moe.layer.MoE`` (created lazily, so
importing condmoe.routing does not import DeepSpeed) so that a DeepSpeed engine
sees it as an MoE layer: expert parameters carry ``allreduce = False`` and
``group_name = "ep_size_{n}"`` (``deepspeed.moe.utils.is_moe_param``), they live
under ``deepspeed_moe.experts.deepspeed_experts.<local id>`` (DeepSpeed's expert
checkpoint layout), and ``set_deepspeed_parallelism`` creates / joins
DeepSpeed's expert-parallel groups, idempotently, so both our constructor and
the engine may call it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .lazy_class import lazy_class, module_getattr

log = logging.getLogger(__name__)


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel group of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def ensure_expert_parallel_group(ep_size: int, use_data_before_expert_parallel_: bool = False):
    """Create (once) and return DeepSpeed's expert-parallel process group of size ``ep_size``.

    Needs torch.distributed initialised (``deepspeed.init_distributed("gloo")`` on CPU).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"ep_size={ep_size} needs torch.distributed initialised first "
            "(call deepspeed.init_distributed('gloo') before building the model)"
        )
    world = dist.get_world_size()
    if world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    from deepspeed.utils import groups

    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
    return groups._get_expert_parallel_group(name)


def mark_expert_params(module: nn.Module, ep_size: int) -> None:
    """Tag parameters the way DeepSpeed tags MoE experts (``is_moe_param`` is then True)."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = expert_group_name(ep_size)


def zero_touch(modules: list[nn.Module]) -> torch.Tensor | float:
    """0 * (sum of the first element of every parameter): keeps idle experts in the autograd graph.

    An expert (or CIGT path) that got no sample this step would otherwise have no
    gradient; data-parallel and expert-data-parallel all-reduces need the same set
    of gradients on every rank, and ZeRO expects one for every trainable parameter.
    """
    total: torch.Tensor | float = 0.0
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                total = total + p.reshape(-1)[0] * 0.0
    return total


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int],  # type: ignore[override]
                group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all_v(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Differentiable variable-size all-to-all of rows of ``x`` (N, ...) over ``group``."""
    return _AllToAllV.apply(x, send, recv, group)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


@functools.cache
def _deepspeed_moe_base() -> type:
    from deepspeed.moe.layer import MoE

    return MoE


def run_by_index(modules: Sequence[nn.Module], x: torch.Tensor, index: torch.Tensor, *, touch_idle: bool = False,
                 out_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Row i of the output is ``modules[index[i]](x[i])``.  x: (N, ...), index: (N,) int64 -> (N, ...out).

    Each module runs once on exactly its rows (one gather in index order, modules with no
    row skipped, one scatter back); a module returning a tuple contributes its first element.
    Used by the expert container below (local experts) and by CIGT's paths.
    touch_idle: with gradients on, the skipped modules join the graph (:func:`zero_touch`).
    out_shape: the shape of one output row, needed only when x has no rows.
    """
    counts = torch.bincount(index, minlength=len(modules)).tolist()
    order = torch.argsort(index, stable=True)
    chunks = torch.split(x[order], counts)  # advanced indexing keeps a channels-last layout
    outs, idle = [], []
    for module, chunk, count in zip(modules, chunks, counts):
        if count == 0:
            idle.append(module)
            continue
        out = module(chunk)
        outs.append(out[0] if isinstance(out, tuple) else out)
    if outs:
        y = torch.cat(outs)[_inverse(order)]
    elif out_shape is not None:
        y = x.new_zeros((0, *out_shape))
    else:
        raise ValueError(f"run_by_index got no rows (x: {tuple(x.shape)}) and no out_shape")
    # With gradients on, the output must always be in the graph (even with no rows): it may feed
    # the backward all-to-all, a collective, and a rank that skipped it would leave the others waiting.
    if (touch_idle or not y.requires_grad) and idle and torch.is_grad_enabled():
        y = y + zero_touch(idle)
    return y


def _make_class() -> type:
    base = _deepspeed_moe_base()

    class ExpertParallelExperts(base):  # type: ignore[misc, valid-type]
        """E whole-network experts; forward(x: (N, ...), expert_index: (N,)) -> (N, *out_shape).

        Row i of the output is ``expert[expert_index[i]](x[i])``; each expert runs
        once on exactly the rows routed to it (experts with none are skipped). With
        ``ep_size > 1`` the rows travel to the expert's worker and back.
        """

        def __init__(self, make_expert: Callable[[], nn.Module], num_experts: int, *, out_shape: tuple[int, ...],
                     ep_size: int = 1, seed: int | None = None) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no TopKGate, the router lives outside
            if num_experts < 1:
                raise ValueError(f"num_experts must be >= 1, got {num_experts}")
            if ep_size < 1 or num_experts % ep_size != 0:
                raise ValueError(f"ep_size={ep_size} must be >= 1 and divide num_experts={num_experts}")
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False
            self.ep_size = ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.num_experts = num_experts
            self.num_local_experts = num_experts // ep_size
            self.out_shape = tuple(out_shape)
            self.ep_group = None
            self.ep_rank = 0
            if ep_size > 1:
                self.set_deepspeed_parallelism()
            # every expert gets its own initialisation, a pure function of (seed, global id), so
            # any ep_size builds the same expert g on whichever rank holds it
            base_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
            local = []
            for lid in range(self.num_local_experts):
                gid = self.ep_rank * self.num_local_experts + lid
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(base_seed + gid)
                    expert = make_expert()
                mark_expert_params(expert, ep_size)
                local.append(expert)
            self.deepspeed_moe = nn.Module()
            self.deepspeed_moe.experts = nn.Module()
            self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(local)

        @property
        def local_experts(self) -> nn.ModuleList:
            return self.deepspeed_moe.experts.deepspeed_experts

        def global_ids(self) -> list[int]:
            """Global expert ids of this worker's local experts."""
            return [self.ep_rank * self.num_local_experts + i for i in range(self.num_local_experts)]

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.ep_group is not None or (self.ep_size == 1 and not dist.is_initialized()):
                return
            self.ep_group = ensure_expert_parallel_group(self.ep_size, use_data_before_expert_parallel_)
            self.ep_rank = dist.get_rank(group=self.ep_group)

        def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if expert_index.shape != x.shape[:1]:
                raise ValueError(f"expert_index must be ({x.shape[0]},), got {tuple(expert_index.shape)}")
            touch = self.training
            if self.ep_size == 1:
                return run_by_index(self.local_experts, x, expert_index, touch_idle=touch, out_shape=self.out_shape)
            if self.ep_group is None:
                self.set_deepspeed_parallelism()
            p, n_local = self.ep_size, self.num_local_experts
            counts = torch.bincount(expert_index, minlength=self.num_experts).view(p, n_local)
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.ep_group)
            send, recv = counts.sum(1).tolist(), recv_counts.sum(1).tolist()
            order = torch.argsort(expert_index, stable=True)
            arrived = all_to_all_v(x[order], send, recv, self.ep_group)
            local_index = torch.repeat_interleave(torch.arange(n_local, device=recv_counts.device).repeat(p),
                                                  recv_counts.reshape(-1))
            y_local = run_by_index(self.local_experts, arrived, local_index, touch_idle=touch,
                                   out_shape=self.out_shape)
            back = all_to_all_v(y_local, recv, send, self.ep_group)
            return back[_inverse(order)]

        def group_sum(self, t: torch.Tensor) -> torch.Tensor:
            """Sum a small statistics tensor over the expert-parallel group (identity for ep_size 1)."""
            if self.ep_size == 1 or self.ep_group is None:
                return t
            t = t.clone()
            dist.all_reduce(t, group=self.ep_group)
            return t

    return ExpertParallelExperts


_expert_class = lazy_class(__name__, "_ExpertParallelExperts", _make_class)
__getattr__ = module_getattr(__name__, {"_ExpertParallelExperts": _expert_class})


def ExpertParallelExperts(make_expert: Callable[[], nn.Module], num_experts: int, *, out_shape: tuple[int, ...],
                          ep_size: int = 1, seed: int | None = None) -> nn.Module:
    """Build the expert container (a ``deepspeed.moe.layer.MoE`` subclass); see the module docstring.

    make_expert: builds one expert (called under a per-expert seed).
    out_shape: the shape of one expert output row (e.g. (num_classes,)).
    """
    return _expert_class()(make_expert, num_experts, out_shape=out_shape, ep_size=ep_size, seed=seed)
