"""run_by_index: the one gather / run / scatter of CoE's local experts and CIGT's paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condmoe.routing.expert_parallel import run_by_index


class _Tupled(nn.Linear):
    """An expert that returns (output, extra), as some MoE experts do: the first element is used."""

    def forward(self, x):
        return super().forward(x), "extra"


def test_each_row_goes_through_its_module_once_and_keeps_its_place():
    torch.manual_seed(0)
    modules = nn.ModuleList([nn.Linear(3, 2), _Tupled(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)])
    x, index = torch.randn(7, 3), torch.tensor([2, 0, 2, 1, 0, 2, 1])
    calls = []
    for k, m in enumerate(modules):
        m.register_forward_hook(lambda mod, inp, out, k=k: calls.append((k, inp[0].shape[0])))
    y = run_by_index(modules, x, index)
    expected = torch.stack([(lambda o: o[0] if isinstance(o, tuple) else o)(modules[int(i)](x[r:r + 1]))[0]
                            for r, i in enumerate(index)])
    assert torch.allclose(y, expected, atol=1e-6)
    assert calls[:3] == [(0, 2), (1, 2), (2, 3)] and len(calls) == 3 + len(index)  # module 3 had no row


def test_idle_modules_join_the_graph_only_when_asked():
    torch.manual_seed(0)
    modules = nn.ModuleList([nn.Linear(3, 2), nn.Linear(3, 2)])
    x, index = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    run_by_index(modules, x, index).sum().backward()
    assert modules[1].weight.grad is None
    run_by_index(modules, x, index, touch_idle=True).sum().backward()
    assert modules[1].weight.grad is not None and not modules[1].weight.grad.any()


def test_no_rows():
    modules = nn.ModuleList([nn.Linear(3, 2), nn.Linear(3, 2)])
    x, index = torch.randn(0, 3), torch.zeros(0, dtype=torch.long)
    y = run_by_index(modules, x, index, out_shape=(2,))
    assert y.shape == (0, 2) and y.requires_grad  # in the graph: it may feed a collective backward
    with pytest.raises(ValueError, match="no out_shape"):
        run_by_index(modules, x, index)
