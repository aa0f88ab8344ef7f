"""A short training run on a Fashion-MNIST slice lowers the loss, for every registered family."""

from __future__ import annotations

import pytest
import torch

from condmoe.routing import build_model, collect_routing_stats

# model -> (options, routing kind)
CASES = {
    "condconv_cnn": (dict(experts=4), "soft"),
    "basisnet_cnn": (dict(experts=4), "soft"),
    "coe_cnn": (dict(experts=4), "hard"),
    "cigt_lenet": (dict(warmup_steps=8, random_path_fraction=0.2, initial_temperature=5.0,
                        temperature_decay=0.98), "hard"),
    "topk_moe_cnn": (dict(experts=4, k=2), "hard"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_short_training_lowers_the_loss(name, fmnist_slice):
    options, kind = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, "tiny", **options)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = fmnist_slice["x_train"][:1536], fmnist_slice["y_train"][:1536]
    xv, yv = fmnist_slice["x_val"], fmnist_slice["y_val"]
    model.train()
    ce = []
    for epoch in range(3):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            out = model(x[idx], y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            ce.append(out.losses["ce"].item())
    stats = collect_routing_stats(model)
    assert stats and all(s.samples == 64 and s.kind == kind for s in stats.values())
    first, last = sum(ce[:4]) / 4, sum(ce[-12:]) / 12
    assert last < 0.6 * first, (first, last)
    model.eval()
    with torch.no_grad():
        acc = float((model(xv).logits.argmax(-1) == yv).float().mean())
    print(f"{name}: cross-entropy {first:.3f} -> {last:.3f}, held-out accuracy {acc:.3f}")
    assert acc > 0.6, acc  # held-out, in eval mode (hard routing: top-1 / argmax); chance is 0.1
