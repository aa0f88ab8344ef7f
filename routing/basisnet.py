"""BasisNet: two-stage model synthesis with early exit.

Zhang et al., "BasisNet: Two-stage Model Synthesis for Efficient Inference",
CVPR 2021 workshops, arXiv 2105.03014. No public code was available to us.

A lightweight model previews the input and outputs a class prediction and
combination coefficients over N basis networks. If its prediction is confident
enough (max softmax >= ``exit_threshold``) inference stops there; otherwise a
specialist is synthesised, every layer's kernel being ``sum_i c_i(x) B_i`` over
that layer's N basis kernels (the single-convolution CondConv form), and the
specialist makes the final prediction. Both stages train jointly:
``loss = CE(specialist) + lambda * CE(lightweight)``.

Design choices where the paper's detail was not available (all options of
:class:`BasisNetConfig`): coefficients = softmax(FC(features) / T); ONE
coefficient vector shared by every specialist layer (the specialist is a
combination of N whole basis networks); optional coefficient dropout;
optional distillation of the lightweight head from the specialist (the
specialist acts as teacher; no external teacher is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model_output import ModelOutput
from .precision import Fp32Linear
from .routing_output import RoutedModule, RoutingOutput, RoutingStats


@dataclass(frozen=True)
class BasisNetConfig:
    """num_bases: N basis networks. temperature: T of the coefficient softmax.
    light_loss_weight: lambda of the joint loss. exit_threshold: early exit when the
    lightweight max-softmax >= this at inference (None: never exit; tune it on
    held-out data with :func:`condmoe.routing.early_exit.tune_exit_threshold`).
    coefficient_dropout: probability of zeroing a coefficient while training
    (then renormalised). distill_weight / distill_temperature: KL of the lightweight
    head to the specialist's (detached) prediction. light_input_scale: the
    lightweight model sees the input resized by this factor (<= 1)."""

    num_bases: int = 8
    temperature: float = 1.0
    light_loss_weight: float = 1.0
    exit_threshold: float | None = None
    coefficient_dropout: float = 0.0
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    light_input_scale: float = 1.0
    light_channels: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self) -> None:
        if self.num_bases < 2:
            raise ValueError(f"BasisNet num_bases must be >= 2, got {self.num_bases}")
        if self.temperature <= 0:
            raise ValueError(f"BasisNet temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.coefficient_dropout < 1.0:
            raise ValueError(f"BasisNet coefficient_dropout must be in [0, 1), got {self.coefficient_dropout}")
        if not 0.0 < self.light_input_scale <= 1.0:
            raise ValueError(f"BasisNet light_input_scale must be in (0, 1], got {self.light_input_scale}")
        if self.exit_threshold is not None and self.exit_threshold < 0:
            raise ValueError(f"BasisNet exit_threshold must be >= 0 or None, got {self.exit_threshold}")


class LightweightModel(nn.Module):
    """Small CNN: (B, C, H, W) -> (class logits (B, K), features (B, F)).

    Strided 3x3 convolutions (stride 2 for all but the last), BN, ReLU, GAP.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: tuple[int, ...], input_scale: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for i, out_ch in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers += [nn.Conv2d(ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            ch = out_ch
        self.body = nn.Sequential(*layers)
        self.classifier = Fp32Linear(ch, num_classes)  # fp32 logits: their max-softmax decides the exit
        self.input_scale = input_scale
        self.out_features = ch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_scale < 1.0:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        feats = self.body(x).mean(dim=(2, 3))
        return self.classifier(feats), feats


class BasisCoefficients(RoutedModule):
    """c(x) = softmax(FC(features) / T) over N bases, with optional coefficient dropout.

    forward(features: (B, F), exited: (B,) bool | None) -> RoutingOutput (weights (B, N)).
    Stats: load = coefficients summed over the samples the specialist ran on;
    early_exits = samples that stopped at the lightweight model.
    """

    def __init__(self, in_features: int, num_bases: int, temperature: float, dropout: float) -> None:
        super().__init__()
        self.fc = Fp32Linear(in_features, num_bases)  # coefficient logits and softmax in fp32
        self.temperature = temperature
        self.dropout = dropout

    def forward(self, features: torch.Tensor, exited: torch.Tensor | None = None) -> RoutingOutput:
        coeffs = torch.softmax(self.fc(features) / self.temperature, dim=-1)
        if self.training and self.dropout > 0:
            keep = torch.rand_like(coeffs) >= self.dropout
            # never drop every basis of a sample: keep its largest coefficient
            keep |= F.one_hot(coeffs.argmax(-1), coeffs.shape[-1]).bool()
            coeffs = coeffs * keep
            coeffs = coeffs / coeffs.sum(-1, keepdim=True)
        used = coeffs.detach() if exited is None else coeffs.detach()[~exited]
        n_exit = 0 if exited is None else int(exited.sum())
        stats = RoutingStats.from_weights(used, features.shape[0], early_exits=n_exit, kind="soft")
        self.record_stats(stats)
        return RoutingOutput(weights=coeffs, indices=None, stats=stats)


class BasisNet(nn.Module):
    """Lightweight model + coefficient head + specialist of N basis networks.

    ``specialist`` must accept ``(x, routing_weights=(B, N))`` and return a
    ModelOutput (e.g. a CondConvCNN built with ``own_routers=False``).
    ``light``: a lightweight model other than :class:`LightweightModel` (then
    ``config.light_channels`` / ``light_input_scale`` are the caller's business):
    (B, C, H, W) -> (logits (B, K), features (B, F)), with an ``out_features`` attribute.
    forward(x: (B, C, H, W), targets: (B,) | None) -> ModelOutput; ``exited`` is
    set at inference when ``config.exit_threshold`` is not None.
    """

    label_smoothing: float = 0.0  # of the class-target cross-entropies (build_model(label_smoothing=) sets it)

    def __init__(self, specialist: nn.Module, config: BasisNetConfig, *, in_channels: int, num_classes: int,
                 light: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.light = light if light is not None else LightweightModel(
            in_channels, num_classes, config.light_channels, config.light_input_scale)
        self.coefficients = BasisCoefficients(
            self.light.out_features, config.num_bases, config.temperature, config.coefficient_dropout
        )
        self.specialist = specialist

    @torch.no_grad()
    def exit_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lightweight confidence (B,) = max softmax, and its predicted class (B,)."""
        light_logits, _ = self.light(x)
        conf, pred = light_logits.softmax(-1).max(-1)
        return conf, pred

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        light_logits, feats = self.light(x)
        threshold = self.config.exit_threshold
        if self.training or threshold is None:
            coeffs = self.coefficients(feats).weights
            spec_logits = self.specialist(x, routing_weights=coeffs).logits
            out = ModelOutput(logits=spec_logits)
            if targets is not None:
                self._add_loss(out, light_logits, spec_logits, targets)
            return out
        # inference with early exit: the specialist runs only on the samples that stay
        exited = light_logits.softmax(-1).max(-1).values >= threshold
        coeffs = self.coefficients(feats, exited).weights
        logits = light_logits.clone()
        stay = (~exited).nonzero(as_tuple=True)[0]
        if stay.numel() > 0:
            logits[stay] = self.specialist(x[stay], routing_weights=coeffs[stay]).logits.to(logits.dtype)
        out = ModelOutput(logits=logits, exited=exited)
        if targets is not None:
            ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
            out.loss, out.losses = ce, {"ce": ce.detach()}
        return out

    def _add_loss(self, out: ModelOutput, light_logits: torch.Tensor, spec_logits: torch.Tensor,
                  targets: torch.Tensor) -> None:
        cfg = self.config
        ce_spec = F.cross_entropy(spec_logits, targets, label_smoothing=self.label_smoothing)
        ce_light = F.cross_entropy(light_logits, targets, label_smoothing=self.label_smoothing)
        loss = ce_spec + cfg.light_loss_weight * ce_light
        losses = {"ce": ce_spec.detach(), "ce_light": ce_light.detach()}
        if cfg.distill_weight > 0:
            t = cfg.distill_temperature
            kd = F.kl_div(
                F.log_softmax(light_logits / t, -1), F.softmax(spec_logits.detach() / t, -1), reduction="batchmean"
            ) * (t * t)
            loss = loss + cfg.distill_weight * kd
            losses["distill"] = kd.detach()
        out.loss, out.losses = loss, losses
