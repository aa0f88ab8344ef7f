"""CIGT information-gain loss against hand computation and an independent mutual information."""

import math

import pytest
import torch

from condmoe.routing.info_gain import information_gain, information_gain_loss, joint_class_route


def _h(ps: list[float]) -> float:
    return -sum(p * math.log(p) for p in ps if p > 0)


def test_information_gain_hand_computed() -> None:
    # 4 samples, 2 classes, 2 routes
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # p(c, n) by hand: class 0 -> (1 + 0.5, 0 + 0.5) / 4, class 1 -> (0 + 0.25, 1 + 0.75) / 4
    joint = [[1.5 / 4, 0.5 / 4], [0.25 / 4, 1.75 / 4]]
    p_n = [joint[0][0] + joint[1][0], joint[0][1] + joint[1][1]]
    p_c = [sum(joint[0]), sum(joint[1])]
    h_joint = _h([v for row in joint for v in row])
    for beta in (1.0, 2.0, 0.5):
        expected = beta * _h(p_n) + _h(p_c) - h_joint
        got = information_gain(probs, labels, 2, beta=beta)
        assert got.item() == pytest.approx(expected, abs=1e-12)
    assert torch.allclose(joint_class_route(probs, labels, 2), torch.tensor(joint, dtype=torch.float64))
    assert information_gain_loss(probs, labels, 2, weight=1.0).item() == pytest.approx(-(_h(p_n) + _h(p_c) - h_joint))


def test_beta_one_is_mutual_information() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 4, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, 5, (64,), generator=g)
    # I(C; N) = sum p(c,n) log(p(c,n) / (p(c) p(n))), computed with plain loops
    joint = torch.zeros(5, 4, dtype=torch.float64)
    for x in range(64):
        for n in range(4):
            joint[labels[x], n] += probs[x, n] / 64
    mi = 0.0
    for c in range(5):
        for n in range(4):
            pcn = joint[c, n].item()
            if pcn > 0:
                mi += pcn * math.log(pcn / (joint[c].sum().item() * joint[:, n].sum().item()))
    assert information_gain(probs, labels, 5, beta=1.0).item() == pytest.approx(mi, abs=1e-10)


def test_perfect_routing_maximises_gain_and_gradient_flows() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    uniform = torch.full((4, 2), 0.5, requires_grad=True)
    assert information_gain(perfect, labels, 2).item() == pytest.approx(math.log(2), abs=1e-6)
    ig = information_gain(uniform, labels, 2)
    assert ig.item() == pytest.approx(0.0, abs=1e-6)
    information_gain_loss(torch.softmax(torch.randn(4, 2, requires_grad=True), -1), labels, 2).backward()


def test_bad_labels_raise() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        information_gain(torch.full((2, 2), 0.5), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="route_probs must be"):
        information_gain(torch.full((2,), 0.5), torch.tensor([0, 1]), 3)
