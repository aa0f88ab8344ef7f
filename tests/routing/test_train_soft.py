"""A short training run on a Fashion-MNIST slice lowers the loss (CondConv, BasisNet)."""

from __future__ import annotations

import pytest
import torch

from condmoe.routing import build_model, collect_routing_stats


def _val_accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).logits.argmax(-1) == y).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["condconv_cnn", "basisnet_cnn"])
def test_short_training_lowers_the_loss(name, fmnist_slice):
    torch.manual_seed(0)
    model = build_model(name, "tiny", experts=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = fmnist_slice["x_train"], fmnist_slice["y_train"]
    xv, yv = fmnist_slice["x_val"], fmnist_slice["y_val"]
    model.train()
    losses = []
    for epoch in range(4):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            out = model(x[idx], y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    stats = collect_routing_stats(model)
    assert stats and all(s.samples == 64 for s in stats.values())
    first, last = sum(losses[:5]) / 5, sum(losses[-32:]) / 32
    assert last < 0.7 * first, (first, last)
    acc = _val_accuracy(model, xv, yv)
    print(f"{name}: loss {first:.3f} -> {last:.3f}, held-out accuracy {acc:.3f}")
    assert acc > 0.5  # held-out, in eval mode; chance is 0.1
