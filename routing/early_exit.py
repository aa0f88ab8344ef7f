"""Early-exit threshold tuning, shared by BasisNet and CoE.

METHODS.md: exit thresholds are tuned on a held-out split of the training data,
never on the test set. Given, per held-out sample, the early stage's confidence
and whether the early and the final prediction are right, pick the lowest
threshold (most exits, least cost) whose accuracy stays within ``max_accuracy_drop``
of never exiting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExitTuning:
    threshold: float
    exit_rate: float
    accuracy: float
    full_accuracy: float


def tune_exit_threshold(confidence: torch.Tensor, early_correct: torch.Tensor, final_correct: torch.Tensor,
                        max_accuracy_drop: float = 0.005) -> ExitTuning:
    """confidence, early_correct, final_correct: (N,). Samples with confidence >= threshold exit.

    Returns the smallest candidate threshold (candidates: the observed confidences,
    plus one above all of them meaning "never exit") with accuracy >= full - drop.
    """
    n = confidence.numel()
    if n == 0 or early_correct.shape != (n,) or final_correct.shape != (n,):
        raise ValueError(
            f"tune_exit_threshold needs three (N,) tensors with N > 0, got {tuple(confidence.shape)}, "
            f"{tuple(early_correct.shape)}, {tuple(final_correct.shape)}"
        )
    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    order = torch.argsort(confidence, descending=True)
    conf = confidence[order].double()
    early = early_correct[order].double()
    final = final_correct[order].double()
    full = final.mean().item()
    # exiting the top-j most confident: accuracy = (early hits among them + final hits among the rest) / n
    early_cum = torch.cat([torch.zeros(1, dtype=torch.float64), early.cumsum(0)])
    final_rest = final.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), final.cumsum(0)])
    acc = (early_cum + final_rest) / n
    best_j = 0
    for j in range(1, n + 1):
        # ties: a threshold exits every sample at that confidence, so only cut between distinct values
        if j < n and conf[j] == conf[j - 1]:
            continue
        if acc[j].item() >= full - max_accuracy_drop:
            best_j = j
    threshold = conf[best_j - 1].item() if best_j > 0 else conf[0].item() + 1e-6
    return ExitTuning(threshold=threshold, exit_rate=best_j / n, accuracy=acc[best_j].item(), full_accuracy=full)
