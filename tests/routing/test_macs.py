"""Multiply-add counts equal hand-computed values, early exit averaged over the batch."""

from __future__ import annotations

import torch

from condmoe.routing.basisnet import BasisNet, BasisNetConfig
from condmoe.routing.macs import count_macs
from condmoe.routing.models.condconv_cnn import CondConvCNN, CondConvCNNSize

TINY = CondConvCNNSize(stem=2, stages=((4, 1, 1),), expand_ratio=2, head=8)


def test_condconv_network_counts_by_hand():
    # input (1, 4, 4); 2 experts; one block 2 -> hidden 4 -> 4 channels at 4x4 (16 positions)
    model = CondConvCNN(TINY, experts=2, num_classes=10, in_channels=1)
    stem = 2 * 16 * (1 * 9)                      # 3x3 conv 1 -> 2
    router = 2 * 2                               # FC 2 -> 2 experts on the pooled block input
    expand = 4 * 16 * 2 + 2 * (4 * 2)            # 1x1 conv 2 -> 4, + mixing E x kernel size
    depthwise = 4 * 16 * 9 + 2 * (4 * 1 * 9)     # 3x3 depthwise on 4 channels, + mixing
    project = 4 * 16 * 4 + 2 * (4 * 4)           # 1x1 conv 4 -> 4, + mixing
    head = 8 * 16 * 4                            # 1x1 conv 4 -> 8
    classifier = 10 * 8                          # FC 8 -> 10
    expected = stem + router + expand + depthwise + project + head + classifier
    assert expected == 1964
    report = count_macs(model, torch.randn(3, 1, 4, 4))
    assert report.per_sample == expected
    assert report.by_module["blocks.0.router.fc"] == router


def test_static_baseline_has_no_routing_or_mixing_cost():
    model = CondConvCNN(TINY, experts=1, num_classes=10, in_channels=1)
    expected = 2 * 16 * 9 + 4 * 16 * 2 + 4 * 16 * 9 + 4 * 16 * 4 + 8 * 16 * 4 + 10 * 8
    assert count_macs(model, torch.randn(2, 1, 4, 4)).per_sample == expected


def _basisnet(threshold):
    specialist = CondConvCNN(TINY, experts=2, num_classes=10, in_channels=1, own_routers=False)
    cfg = BasisNetConfig(num_bases=2, exit_threshold=threshold, light_channels=(3,))
    return BasisNet(specialist, cfg, in_channels=1, num_classes=10)


def test_basisnet_early_exit_is_averaged_over_the_batch():
    torch.manual_seed(0)
    light = 3 * 16 * 9 + 10 * 3                 # one 3x3 conv 1 -> 3 (stride 1: the only layer), FC 3 -> 10
    coeff = 2 * 3                               # coefficient FC 3 -> 2 bases
    specialist = 1964 - 2 * 2                   # the CondConv network without per-block routers
    x = torch.randn(8, 1, 4, 4)
    assert count_macs(_basisnet(0.0), x).per_sample == light + coeff  # everyone exits
    assert count_macs(_basisnet(2.0), x).per_sample == light + coeff + specialist  # nobody exits
    # a threshold between: the specialist is paid only for the samples that stay
    model = _basisnet(None)
    conf, _ = model.eval().exit_scores(x)
    thr = conf.median().item()
    model.config = BasisNetConfig(num_bases=2, exit_threshold=thr, light_channels=(3,))
    stay = int((conf < thr).sum())
    assert 0 < stay < 8
    assert count_macs(model, x).per_sample == light + coeff + specialist * stay / 8
