"""CoE: Collaboration of Experts, hard top-1 expert selection with early exit.

Zhang, Chen, Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on
ImageNet with 100M FLOPs", ICML 2022, arXiv 2107.03815. No public code was
available to us.

A small delegator sees each sample first and outputs (a) which of E expert
networks should handle it, (b) a rough class prediction and (c) an uncertainty
estimate of that prediction (VCM). At inference a sample whose uncertainty is
<= ``exit_threshold`` stops at the delegator (early exit); every other sample
runs through ONLY its selected expert, so the cost is delegator + one expert
however many experts there are. The experts live in an
:func:`~condmoe.routing.expert_parallel.ExpertParallelExperts` container, so
with ``ep_size > 1`` they are spread over workers and samples travel to their
expert's worker.

The paper's three training modules; their internals were not available to us,
so these are our design, each a :class:`CoEConfig` option:

- WGM (weight generation): expert e's loss on sample x is weighted by
  ``w = (1 - wgm_floor) * q_e(x) + wgm_floor / E``, q = the delegator's
  (detached) selection probabilities at temperature ``wgm_temperature``; the
  floor keeps every expert seeing some of everything.
- LGM (label generation): the delegator's selection target for x is the expert
  with the lowest loss on x (computed without gradient). ``lgm="balanced"``
  assigns greedily in order of increasing loss with at most
  ceil(B / E * lgm_capacity_factor) samples per expert, so no expert is starved;
  ``lgm="argmin"`` takes the plain argmin.
- VCM (variance calculation): ``vcm="learned"``: a head trained (BCE) to
  predict that the rough prediction is wrong; uncertainty = its sigmoid.
  ``vcm="entropy"``: normalised entropy of the rough prediction (no parameters).

Training runs every expert on every sample (``train_routing="dense"``): the LGM
needs each expert's loss on each sample, and the WGM weights all of them. The
returned logits are those of the selected expert (what inference would use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .expert_parallel import ExpertParallelExperts
from .model_output import ModelOutput
from .norm import make_norm
from .precision import Fp32Linear
from .routing_output import RoutedModule, RoutingOutput, RoutingStats

_LGM = ("balanced", "argmin")
_VCM = ("learned", "entropy")


@dataclass(frozen=True)
class CoEConfig:
    """num_experts: E. exit_threshold: exit when uncertainty <= this at inference (None: never).
    wgm_floor / wgm_temperature: WGM weights. lgm / lgm_capacity_factor: LGM labels.
    vcm: uncertainty estimate. *_loss_weight: weights of the delegator's selection CE,
    rough-prediction CE and VCM loss. ep_size: expert-parallel group size."""

    num_experts: int = 4
    exit_threshold: float | None = None
    wgm_floor: float = 0.1
    wgm_temperature: float = 1.0
    lgm: str = "balanced"
    lgm_capacity_factor: float = 1.25
    vcm: str = "learned"
    selection_loss_weight: float = 1.0
    rough_loss_weight: float = 0.5
    vcm_loss_weight: float = 0.1
    ep_size: int = 1
    train_routing: str = "dense"

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"CoE num_experts must be >= 1, got {self.num_experts}")
        if not 0.0 <= self.wgm_floor <= 1.0:
            raise ValueError(f"CoE wgm_floor must be in [0, 1], got {self.wgm_floor}")
        if self.wgm_temperature <= 0:
            raise ValueError(f"CoE wgm_temperature must be > 0, got {self.wgm_temperature}")
        if self.lgm not in _LGM:
            raise ValueError(f"CoE lgm must be one of {_LGM}, got {self.lgm!r}")
        if self.lgm_capacity_factor < 1.0:
            raise ValueError(f"CoE lgm_capacity_factor must be >= 1, got {self.lgm_capacity_factor}")
        if self.vcm not in _VCM:
            raise ValueError(f"CoE vcm must be one of {_VCM}, got {self.vcm!r}")
        if self.exit_threshold is not None and not 0.0 <= self.exit_threshold <= 1.0:
            raise ValueError(f"CoE exit_threshold must be in [0, 1] or None, got {self.exit_threshold}")
        if self.train_routing != "dense":
            raise ValueError(f"CoE train_routing must be 'dense' (the LGM needs every expert's loss), "
                             f"got {self.train_routing!r}")


@dataclass(frozen=True)
class DelegatorOutput:
    """select_logits: (B, E); rough_logits: (B, K); vcm_logit: (B,) (learned VCM) or None."""

    select_logits: torch.Tensor
    rough_logits: torch.Tensor
    vcm_logit: torch.Tensor | None


class Delegator(nn.Module):
    """Small CNN: (B, C, H, W) -> DelegatorOutput. Strided 3x3 conv / BN / ReLU, GAP, three FC heads.

    input_scale < 1: the delegator previews a downscaled image (area-averaged), as
    BasisNet's lightweight model may; it runs on every sample, so its cost is paid
    E-independently on top of the one expert.
    backbone: instead of the conv stack, any module (B, C, H, W) -> (B, F, h, w) or
    pooled (B, F) with ``backbone_features`` = F (e.g. a MobileNetV3-Small body).
    """

    def __init__(self, in_channels: int, num_classes: int, num_experts: int, channels: tuple[int, ...],
                 learned_vcm: bool, norm: str = "batch", input_scale: float = 1.0,
                 backbone: nn.Module | None = None, backbone_features: int | None = None) -> None:
        super().__init__()
        if not 0.0 < input_scale <= 1.0:
            raise ValueError(f"Delegator input_scale must be in (0, 1], got {input_scale}")
        if (backbone is None) != (backbone_features is None):
            raise ValueError("Delegator backbone and backbone_features go together")
        self.input_scale = input_scale
        if backbone is not None:
            self.body, ch = backbone, int(backbone_features)
        else:
            layers: list[nn.Module] = []
            ch = in_channels
            for out_ch in channels:
                layers += [nn.Conv2d(ch, out_ch, 3, 2, 1, bias=False), make_norm(norm, out_ch),
                           nn.ReLU(inplace=True)]
                ch = out_ch
            self.body = nn.Sequential(*layers)
        # the three heads decide selection, exit and the rough prediction: fp32 logits (precision.py)
        self.select = Fp32Linear(ch, num_experts)
        self.rough = Fp32Linear(ch, num_classes)
        self.vcm = Fp32Linear(ch, 1) if learned_vcm else None

    def forward(self, x: torch.Tensor) -> DelegatorOutput:
        f = self.features(x)
        vcm = self.vcm(f).squeeze(-1) if self.vcm is not None else None
        return DelegatorOutput(self.select(f), self.rough(f), vcm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, F) pooled features the three heads read."""
        if self.input_scale < 1.0:
            k = round(1.0 / self.input_scale)
            if abs(k * self.input_scale - 1.0) < 1e-6 and x.shape[-2] % k == 0 and x.shape[-1] % k == 0:
                x = F.avg_pool2d(x, k)
            else:
                x = F.interpolate(x, scale_factor=self.input_scale, mode="area")
        f = self.body(x)
        return f if f.dim() == 2 else f.mean(dim=(2, 3))


def balanced_assignment(losses: torch.Tensor, capacity: int) -> torch.Tensor:
    """LGM labels: (B, E) losses -> (B,) expert per sample, greedy by increasing loss, <= capacity each.

    Needs capacity * E >= B.
    """
    b, e = losses.shape
    if capacity * e < b:
        raise ValueError(f"LGM capacity {capacity} x {e} experts cannot hold {b} samples")
    order = torch.argsort(losses.reshape(-1), stable=True).tolist()
    label = [-1] * b
    load = [0] * e
    left = b
    for flat in order:
        i, j = divmod(flat, e)
        if label[i] < 0 and load[j] < capacity:
            label[i], load[j] = j, load[j] + 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(label, dtype=torch.long, device=losses.device)


class CoE(RoutedModule):
    """Delegator + E experts (each (B, C, H, W) -> (B, K) logits) with early exit.

    forward(x: (B, C, H, W), targets: (B,) | None) -> ModelOutput. ``exited`` is
    a (B,) bool tensor at inference when ``exit_threshold`` is set, else None.
    Records RoutingStats: load = samples per selected expert (those that did not
    exit), early_exits, samples = B: this rank's in ``last_stats`` (collected by
    collect_routing_stats), summed over the expert-parallel group in ``last_group_stats``.
    """

    # of the class-target cross-entropies, not the selection loss (build_model(label_smoothing=) sets it)
    label_smoothing: float = 0.0

    def __init__(self, delegator: Delegator, make_expert, config: CoEConfig, *, num_classes: int,
                 seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.delegator = delegator
        self.experts = ExpertParallelExperts(make_expert, config.num_experts, out_shape=(num_classes,),
                                             ep_size=config.ep_size, seed=seed)
        self.last_group_stats: RoutingStats | None = None

    def uncertainty(self, d: DelegatorOutput) -> torch.Tensor:
        """(B,) in [0, 1]: the VCM's estimate of how unreliable the rough prediction is."""
        if self.config.vcm == "learned":
            return torch.sigmoid(d.vcm_logit)
        p = d.rough_logits.softmax(-1)
        return -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(self.num_classes)

    @torch.no_grad()
    def exit_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence = 1 - uncertainty (B,), rough prediction (B,)) for threshold tuning.

        :func:`condmoe.routing.early_exit.tune_exit_threshold` returns a confidence
        threshold t; the matching ``exit_threshold`` is ``1 - t``.
        """
        d = self.delegator(x)
        return 1.0 - self.uncertainty(d), d.rough_logits.argmax(-1)

    def _record(self, selected: torch.Tensor, samples: int, exits: int) -> None:
        """Record this rank's stats (what collect_routing_stats reads; the trainer sums ranks)
        and, in ``last_group_stats``, their sum over the expert-parallel group."""
        counters = torch.cat([torch.bincount(selected, minlength=self.config.num_experts).double(),
                              torch.tensor([samples, exits], dtype=torch.float64, device=selected.device)])

        def to_stats(c: torch.Tensor) -> RoutingStats:
            return RoutingStats.from_load(c[:-2], int(c[-2].item()), early_exits=int(c[-1].item()))

        self.record_stats(to_stats(counters))
        self.last_group_stats = to_stats(self.experts.group_sum(counters)) if self.config.ep_size > 1 \
            else self.last_stats

    def route(self, x: torch.Tensor) -> tuple[RoutingOutput, DelegatorOutput]:
        """The delegator's decision: weights (B, E) selection probabilities, indices (B, 1)."""
        d = self.delegator(x)
        probs = d.select_logits.softmax(-1)
        sel = probs.argmax(-1)
        stats = RoutingStats.from_load(torch.bincount(sel, minlength=self.config.num_experts), x.shape[0])
        return RoutingOutput(weights=probs, indices=sel[:, None], stats=stats), d

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        routing, d = self.route(x)
        selected = routing.indices[:, 0]
        if self.training:
            return self._forward_dense(x, targets, d, routing.weights, selected)
        b = x.shape[0]
        threshold = self.config.exit_threshold
        exited = None
        stay = torch.arange(b, device=x.device)
        if threshold is not None:
            exited = self.uncertainty(d) <= threshold
            stay = (~exited).nonzero(as_tuple=True)[0]
        expert_logits = self.experts(x[stay], selected[stay])
        logits = d.rough_logits.clone() if exited is not None else expert_logits
        if exited is not None:
            logits[stay] = expert_logits.to(logits.dtype)
        self._record(selected[stay], b, b - stay.numel())
        out = ModelOutput(logits=logits, exited=exited)
        if targets is not None:
            ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
            out.loss, out.losses = ce, {"ce": ce.detach()}
        return out

    def _forward_dense(self, x: torch.Tensor, targets: torch.Tensor | None, d: DelegatorOutput,
                       probs: torch.Tensor, selected: torch.Tensor) -> ModelOutput:
        cfg, b, e = self.config, x.shape[0], self.config.num_experts
        index = torch.arange(e, device=x.device).repeat_interleave(b)
        all_logits = self.experts(x.repeat(e, *([1] * (x.dim() - 1))), index).view(e, b, -1)
        logits = all_logits[selected, torch.arange(b, device=x.device)]
        self._record(selected, b, 0)
        out = ModelOutput(logits=logits)
        if targets is None:
            return out
        smooth = self.label_smoothing
        per_expert = F.cross_entropy(all_logits.reshape(e * b, -1), targets.repeat(e), reduction="none",
                                     label_smoothing=smooth).view(e, b)
        # WGM: per-sample weights of each expert's loss
        q = (d.select_logits.detach() / cfg.wgm_temperature).softmax(-1)
        w = (1.0 - cfg.wgm_floor) * q + cfg.wgm_floor / e  # (B, E), rows sum to 1
        expert_loss = (w.t() * per_expert).sum(0).mean()
        # LGM: selection targets = the expert that handles the sample best
        with torch.no_grad():
            losses = per_expert.t()
            if cfg.lgm == "balanced":
                labels = balanced_assignment(losses, math.ceil(b / e * cfg.lgm_capacity_factor))
            else:
                labels = losses.argmin(-1)
        selection = F.cross_entropy(d.select_logits, labels)
        rough = F.cross_entropy(d.rough_logits, targets, label_smoothing=smooth)
        loss = expert_loss + cfg.selection_loss_weight * selection + cfg.rough_loss_weight * rough
        losses_out = {"expert_ce": expert_loss.detach(), "selection": selection.detach(), "rough_ce": rough.detach(),
                      "ce": F.cross_entropy(logits, targets, label_smoothing=smooth).detach()}
        if d.vcm_logit is not None:
            wrong = (d.rough_logits.argmax(-1) != targets).float()
            vcm = F.binary_cross_entropy_with_logits(d.vcm_logit, wrong)
            loss = loss + cfg.vcm_loss_weight * vcm
            losses_out["vcm"] = vcm.detach()
        out.loss, out.losses = loss, losses_out
        return out
