"""Information-gain routing loss of CIGT.

Bicici, Meral, Akarun, "Conditional Information Gain Trellis", arXiv 2402.08345
(public code: ufukcbicici/cigt).

Over a minibatch of B samples with labels c and routing probabilities p(n|x):

    p(c, n) = (1/B) sum_x [y_x = c] p(n|x)
    p(n) = sum_c p(c, n),   p(c) = sum_n p(c, n)
    IG = beta * H(p(n)) + H(p(c)) - H(p(c, n))

With beta = 1 this is the mutual information I(C; N) between the label and the
routing decision. Entropies are -sum p log(p + 1e-30), as in the paper's code.
The training loss subtracts ``lambda * IG`` (maximising the information gain).
"""

from __future__ import annotations

import torch

_EPS = 1e-30


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + _EPS)).sum()


def joint_class_route(route_probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """p(c, n): (num_classes, N) from route_probs (B, N) and labels (B,) int64."""
    if route_probs.dim() != 2:
        raise ValueError(f"route_probs must be (B, N), got shape {tuple(route_probs.shape)}")
    if labels.shape != route_probs.shape[:1]:
        raise ValueError(f"labels must be ({route_probs.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(route_probs.dtype)  # (B, C)
    return one_hot.t() @ route_probs / max(route_probs.shape[0], 1)


def information_gain(route_probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     beta: float = 1.0) -> torch.Tensor:
    """IG = beta * H(p(n)) + H(p(c)) - H(p(c, n)), a scalar (differentiable in route_probs).

    route_probs: (B, N) routing probabilities p(n|x) (rows sum to 1).
    labels: (B,) int64 class labels.
    """
    # at least float32, also from a bf16 model (routing/precision.py)
    joint = joint_class_route(route_probs.to(torch.promote_types(route_probs.dtype, torch.float32)), labels,
                              num_classes)
    p_n = joint.sum(0)
    p_c = joint.sum(1)
    return beta * _entropy(p_n) + _entropy(p_c) - _entropy(joint)


def information_gain_loss(route_probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          beta: float = 1.0, weight: float = 1.0) -> torch.Tensor:
    """The loss term ``-weight * IG`` (to be added to the cross-entropy)."""
    return -weight * information_gain(route_probs, labels, num_classes, beta)
