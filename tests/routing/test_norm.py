"""make_norm: the one normalisation factory of CoE's delegator and experts and cigt_lenet's blocks."""

from __future__ import annotations

import pytest
from torch import nn

from condmoe.routing.norm import make_norm


def test_kinds():
    assert isinstance(make_norm("batch", 16), nn.BatchNorm2d)
    group = make_norm("group", 16)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 8 and group.num_channels == 16
    assert make_norm("group", 4).num_groups == 4
    assert isinstance(make_norm("none", 16), nn.Identity)


def test_unknown_or_refused_kind_names_the_accepted_ones():
    with pytest.raises(ValueError, match="norm must be 'batch', 'group' or 'none', got 'layer'"):
        make_norm("layer", 8)
    with pytest.raises(ValueError, match="norm must be 'batch' or 'none', got 'group'"):
        make_norm("group", 8, kinds=("batch", "none"))
