"""Optimiser pieces of the training recipe that DeepSpeed's JSON does not build.

- :func:`param_groups`: weight decay off for norms and biases, expert (MoE) params
  in their own groups.
- :class:`RMSpropTF`: RMSProp as TensorFlow 1 runs it, the optimiser of the
  MobileNet (arXiv:1704.04861, 1801.04381) and EfficientNet (arXiv:1905.11946)
  recipes that CondConv (arXiv:1904.04971) trains with.
- :class:`CosineSchedule`: linear warm-up, then cosine decay to ``min_lr``.

Adam, AdamW and SGD (Nesterov included) stay in the DeepSpeed JSON
(config.deepspeed_config); ``build_engine`` hands DeepSpeed these objects only
where the job asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .config import JobConfig

# parameters of these modules are scales and shifts, never decayed (BatchNorm, GroupNorm, LayerNorm, ...)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the params weight decay leaves alone: norm weights and biases.

    A param is exempt when it belongs to a normalisation layer, is named ``bias``
    (CondConv's per-expert biases are (E, C_out): 2-D, still biases) or has at
    most one dimension (timm's rule for scales and gains).
    """
    out = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS) or name == "bias" or p.ndim <= 1:
                out.add(f"{mod_name}.{name}" if mod_name else name)
    return out


def param_groups(model: nn.Module, cfg: JobConfig) -> list[dict]:
    """Optimiser groups: "decay" and "no_decay" (norms and biases, weight decay 0, when
    ``optim.no_decay_norm_bias`` and weight decay is on), expert params split out of each
    into DeepSpeed's MoE groups (one per expert-parallel group, same weight decay)."""
    o = cfg.optim
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = no_decay_names(model) if o.no_decay_norm_bias and o.weight_decay > 0 else set()
    groups = [{"params": [p for n, p in trainable if n not in exempt], "name": "decay",
               "weight_decay": o.weight_decay},
              {"params": [p for n, p in trainable if n in exempt], "name": "no_decay", "weight_decay": 0.0}]
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param(p) for _, p in trainable):
        # distinct input names: the split keys its MoE groups by the input group's name
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp in TensorFlow 1's form (tf.train.RMSPropOptimizer, as timm's RMSpropTF)::

        ms  <- alpha * ms + (1 - alpha) * g^2            ms starts at 1, not 0
        buf <- momentum * buf + lr * g / sqrt(ms + eps)   eps inside the root, lr inside the buffer
        p   <- p - buf

    torch.optim.RMSprop differs in all three: its mean square starts at 0 (the first
    steps are ~1/sqrt(1 - alpha) times larger), it adds eps outside the root (TF's
    eps=1e-3 is about torch's 3e-2), and it scales the buffer by the lr when it
    applies it (the same for a constant lr, not under a schedule). ``weight_decay``
    is L2 added to the gradient, as the recipes add it to the loss. State keys:
    ``step``, ``square_avg``, ``momentum_buffer`` (the portable checkpoint's names).
    """

    def __init__(self, params: Iterable, lr: float, alpha: float = 0.9, eps: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        for name, value, low in (("lr", lr, 0.0), ("eps", eps, 0.0), ("momentum", momentum, 0.0),
                                 ("weight_decay", weight_decay, 0.0)):
            if value < low:
                raise ValueError(f"RMSpropTF: {name} must be >= {low}, got {value}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"RMSpropTF: alpha must be in [0, 1), got {alpha}")
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps, mom, wd = (group[k] for k in ("lr", "alpha", "eps", "momentum", "weight_decay"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    if mom > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                square_avg = state["square_avg"]
                square_avg.mul_(alpha).addcmul_(grad, grad, value=1.0 - alpha)
                denom = square_avg.add(eps).sqrt_()
                if mom > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(mom).addcdiv_(grad, denom, value=lr)
                    p.sub_(buf)
                else:
                    p.addcdiv_(grad, denom, value=-lr)
        return loss


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The lr of optimiser step ``step`` (1-based): linear warm-up to ``lr`` over the first
    ``warmup_steps`` steps (lr * step / warmup_steps), then cosine decay that reaches
    ``min_lr`` at ``total_steps`` and stays there."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineSchedule:
    """:func:`cosine_lr` over an optimiser's groups, shaped like DeepSpeed's schedulers.

    ``last_batch_iteration`` counts the scheduler steps taken minus one (DeepSpeed
    steps it after every optimiser step): after ``k`` optimiser steps it is k - 1
    and the groups hold the lr of step k + 1. ``state_dict`` is that one number;
    ``step(i)`` re-applies iteration ``i``'s lr (how the portable restore and
    DeepSpeed's own load leave the groups ready for the next step). Each group's
    lr is its initial lr scaled by cosine_lr(step) / lr.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                 total_steps: int, last_batch_iteration: int = -1) -> None:
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup_steps, self.total_steps = lr, min_lr, warmup_steps, total_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step(last_batch_iteration)

    def step(self, last_batch_iteration: int | None = None) -> None:
        it = self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        self.last_batch_iteration = it
        ratio = cosine_lr(it + 2, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps) / self.lr
        self._last_lr = [base * ratio for base in self.base_lrs]
        for group, value in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = value

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.step(int(state["last_batch_iteration"]))


def client_optimizer(cfg: JobConfig):
    """What ``deepspeed.initialize(optimizer=...)`` gets: a builder over the param groups for
    the optimisers DeepSpeed's JSON cannot name (rmsprop), else None (the JSON's optimizer)."""
    o = cfg.optim
    if o.optimizer != "rmsprop":
        return None
    eps = 1e-3 if o.eps is None else o.eps
    return lambda groups: RMSpropTF(groups, lr=o.lr, alpha=o.alpha, eps=eps, momentum=o.momentum,
                                    weight_decay=o.weight_decay)


def client_scheduler(cfg: JobConfig):
    """What ``deepspeed.initialize(lr_scheduler=...)`` gets: a builder of :class:`CosineSchedule`
    for ``optim.schedule: cosine``, else None (the JSON's scheduler, or none)."""
    o = cfg.optim
    if o.schedule != "cosine":
        return None
    return lambda optimizer: CosineSchedule(optimizer, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
                                            total_steps=o.steps)
