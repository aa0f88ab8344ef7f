"""What every registered network returns: one shape for the single train loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """Output of a condmoe network's forward.

    logits: (B, num_classes), the prediction actually used for each sample
        (for an early-exited sample, the lightweight model's / delegator's).
    loss: the training loss (task loss + weighted aux losses) when targets
        were given to forward, else None.
    losses: named components of ``loss`` (detached is not required) for logging.
    exited: (B,) bool, True where the sample left early; None without early exit.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    exited: torch.Tensor | None = None
