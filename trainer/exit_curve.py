"""Early-exit curves from one checkpoint in one pass: accuracy beside average multiply-adds per threshold.

BasisNet (arXiv 2105.03014) and CoE (arXiv 2107.03815) stop at their cheap
first stage when it is sure enough. Retraining per threshold is unnecessary:
one pass over the split records, per image, the quantity the threshold is
compared with (BasisNet: the lightweight model's max softmax, exit when
>= t; CoE: the VCM's uncertainty, exit when <= t), the early prediction and
the full prediction (the model run with no exit). Any threshold then gives

    accuracy(t) = mean over images of [early if exits(t) else full] == label
    MAdds(t)    = light + (1 - exit_rate(t)) * heavy

where ``light`` (lightweight model / delegator, and what runs on every image)
and ``heavy`` (specialist / one expert) are measured with
:func:`condmoe.routing.macs.count_macs` on the checkpoint's own network: once
with no exit (light + heavy) and once at a threshold where images exit.
The papers count cost the same way (METHODS.md: the cheap stage on every
sample, the expensive one only on those that stay).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from condmoe.routing import BasisNet, CoE
from condmoe.routing.macs import count_macs

log = logging.getLogger(__name__)

# thresholds of `condmoe eval --exit-thresholds` and a sweep's curves when none are given
DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)


@dataclass(frozen=True)
class ExitRule:
    """How a family exits: ``score(model, x)`` -> (the quantity compared with the threshold (B,),
    the early prediction (B,)); ``exits(score, t)`` -> (B,) bool; ``all_exit``: a threshold at which
    every image exits (for measuring the light part); ``text``: the rule in words."""

    score: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    exits: Callable[[torch.Tensor, float], torch.Tensor]
    all_exit: float
    text: str


def _basisnet_score(model: BasisNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    light_logits, _ = model.light(x)
    conf, pred = light_logits.softmax(-1).max(-1)  # exactly what BasisNet.forward compares
    return conf, pred


def _coe_score(model: CoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = model.delegator(x)
    return model.uncertainty(d), d.rough_logits.argmax(-1)  # exactly what CoE.forward compares


RULES: dict[type, ExitRule] = {
    BasisNet: ExitRule(_basisnet_score, lambda s, t: s >= t, 0.0,
                       "exit when the lightweight model's max softmax >= t"),
    CoE: ExitRule(_coe_score, lambda s, t: s <= t, 1.0,
                  "exit when the delegator's uncertainty (VCM) <= t"),
}


def exit_rule(model: nn.Module) -> ExitRule:
    """The rule of ``model``'s family; ValueError naming the class for a network without early exit."""
    for cls, rule in RULES.items():
        if isinstance(model, cls):
            return rule
    raise ValueError(f"{type(model).__name__} has no early exit (exit curves: BasisNet and CoE families)")


def _with_threshold(model: nn.Module, threshold: float | None) -> None:
    model.config = dataclasses.replace(model.config, exit_threshold=threshold)


@dataclass
class ExitPass:
    """Per image of the split: score (N,), early and full predictions (N,), labels (N,);
    light / heavy multiply-adds per image; the rule."""

    score: torch.Tensor
    early: torch.Tensor
    full: torch.Tensor
    labels: torch.Tensor
    light_macs: float
    heavy_macs: float
    rule: ExitRule

    def at(self, threshold: float) -> dict[str, float]:
        """Accuracy, exit rate and average MAdds per image at ``threshold``."""
        exits = self.rule.exits(self.score, threshold)
        pred = torch.where(exits, self.early, self.full)
        n = max(int(self.labels.numel()), 1)
        rate = exits.sum().item() / n
        return {"threshold": float(threshold), "accuracy": (pred == self.labels).sum().item() / n,
                "exit_rate": rate, "macs_per_sample": self.light_macs + (1.0 - rate) * self.heavy_macs}

    def curve(self, thresholds: Iterable[float]) -> list[dict[str, float]]:
        return [self.at(t) for t in thresholds]

    def endpoints(self) -> dict[str, dict[str, float]]:
        """The lightweight stage alone (every image exits) and the full model (none does)."""
        n = max(int(self.labels.numel()), 1)
        return {"light": {"accuracy": (self.early == self.labels).sum().item() / n, "exit_rate": 1.0,
                          "macs_per_sample": self.light_macs},
                "full": {"accuracy": (self.full == self.labels).sum().item() / n, "exit_rate": 0.0,
                         "macs_per_sample": self.light_macs + self.heavy_macs}}


def _measure_macs(model: nn.Module, rule: ExitRule, x: torch.Tensor) -> tuple[float, float]:
    """(light, heavy) multiply-adds per image, by count_macs with no exit and with (mostly) all exiting."""
    _with_threshold(model, None)
    full = count_macs(model, x).per_sample
    _with_threshold(model, rule.all_exit)
    rate = rule.exits(rule.score(model, x)[0], rule.all_exit).double().mean().item()
    measured = count_macs(model, x).per_sample
    if rate <= 0:
        raise RuntimeError("no image exits at the all-exit threshold: cannot measure the light part")
    # measured = light + (1 - rate) * heavy and full = light + heavy (rate is 1 but for ties at the edge)
    light = (measured - (1.0 - rate) * full) / rate
    return light, full - light


@torch.no_grad()
def exit_pass(model: nn.Module, batches: Iterable, *, max_batches: int | None = None) -> ExitPass:
    """One pass over ``batches`` (objects with .images (B, C, H, W), .labels (B,), optional .valid (B,)
    masking padding) through ``model`` (a BasisNet or CoE, on one process) in eval mode."""
    rule = exit_rule(model)
    saved, was_training = model.config, model.training
    model.eval()
    scores, early, full, labels = [], [], [], []
    macs: tuple[float, float] | None = None
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = batch.images, batch.labels
            valid = getattr(batch, "valid", None)
            valid = torch.ones_like(y, dtype=torch.bool) if valid is None else valid
            if macs is None:
                macs = _measure_macs(model, rule, x[valid])
            _with_threshold(model, None)
            logits = model(x).logits
            s, e = rule.score(model, x)
            scores.append(s[valid].double())
            early.append(e[valid])
            full.append(logits.argmax(-1)[valid])
            labels.append(y[valid])
    finally:
        model.config = saved
        model.train(was_training)
        from condmoe.routing import collect_routing_stats

        collect_routing_stats(model)  # evaluation routing is not training load
    if macs is None:
        raise ValueError("the split yielded no batches")
    return ExitPass(torch.cat(scores), torch.cat(early), torch.cat(full), torch.cat(labels), macs[0], macs[1], rule)


def parse_thresholds(text: str) -> list[float]:
    """``"0.5,0.6,0.9"`` -> [0.5, 0.6, 0.9] (ValueError naming a bad item)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--exit-thresholds: {item!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"--exit-thresholds: {item!r} is not finite")
        out.append(value)
    if not out:
        raise ValueError("--exit-thresholds: no thresholds given")
    return out


def write_curve(result: dict, out: str | Path) -> tuple[Path, Path]:
    """``<out>.json`` (the whole result) and ``<out>.parquet`` (one row per threshold)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js, pqt = out.with_suffix(".json"), out.with_suffix(".parquet")
    js.write_text(json.dumps(result, indent=1, default=str) + "\n")
    pq.write_table(pa.Table.from_pylist(result["curve"]), pqt)
    return js, pqt
