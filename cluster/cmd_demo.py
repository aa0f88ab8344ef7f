"""``condmoe demo``: train a small CondConv network on Fashion-MNIST and show what it learned.

In one process: a condconv_cnn (8 experts) and its static baseline of the same shape
(experts: 1) train for one pass over a slice of Fashion-MNIST; the demo prints test
accuracy beside multiply-adds per sample, and how the experts are used per layer.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from rich.console import Console
from rich.table import Table

from condmoe.datasets.idx import load_default_images
from condmoe.routing import accumulate_stats, build_model, collect_routing_stats
from condmoe.routing.macs import count_macs

from .expert_view import expert_table

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small CondConv network on Fashion-MNIST and show expert use")
    p.add_argument("--train-samples", type=int, default=12000, help="training slice size (default 12000)")
    p.add_argument("--test-samples", type=int, default=2000, help="test slice size (default 2000)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", default="small", help="condconv_cnn size (tiny, small, base)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _tensors(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    images, labels, name = load_default_images(split, limit=limit)
    x = torch.from_numpy(images.copy()).float().div_(255.0)
    x = x.sub_(x.mean()).div_(x.std()).unsqueeze(1)
    return x, torch.from_numpy(labels), name


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, console: Console, label: str) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 128
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    totals: dict = {}
    step = 0
    start = time.perf_counter()
    with console.status(f"training {label}") as status:
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(x) - batch + 1, batch):
                idx = perm[i : i + batch]
                out = model(x[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                sched.step()
                totals = accumulate_stats(totals, collect_routing_stats(model))
                step += 1
                if step % 10 == 0 or step == steps:
                    msg = f"training {label}: step {step}/{steps}, loss {out.loss.item():.3f}"
                    status.update(msg)
                    if not console.is_terminal and (step % 50 == 0 or step == steps):
                        console.print(msg)  # a log gets progress lines instead of a spinner
    return {"stats": totals, "seconds": time.perf_counter() - start, "steps": steps}


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(x[i : i + 500]).logits.argmax(-1) == y[i : i + 500]).sum()) for i in range(0, len(x), 500))
    return hits / len(x)


def run(args: argparse.Namespace) -> int:
    console = Console(width=None if Console().is_terminal else 130)
    torch.manual_seed(args.seed)
    x, y, source = _tensors("train", args.train_samples)
    xt, yt, _ = _tensors("test", args.test_samples)
    console.print(f"[bold]condmoe demo[/]: {source}, {len(x)} training / {len(xt)} test images, "
                  f"{torch.get_num_threads()} threads")
    results = Table(title="test accuracy beside cost", title_justify="left")
    for col in ("model", "experts", "params", "MAdds/sample", "test accuracy", "train time"):
        results.add_column(col, justify="left" if col == "model" else "right")
    routed_stats = {}
    for experts in (args.experts, 1):
        torch.manual_seed(args.seed)
        model = build_model("condconv_cnn", args.size, experts=experts)
        label = f"condconv_cnn/{args.size} ({'static baseline' if experts == 1 else f'{experts} experts'})"
        run_info = _train(model, x, y, args.epochs, console, label)
        acc = _accuracy(model, xt, yt)
        macs = count_macs(model, xt[:64])
        collect_routing_stats(model)  # drop the eval batches' stats
        params = sum(p.numel() for p in model.parameters())
        results.add_row(label, str(experts), f"{params / 1e3:.0f}k", f"{macs.per_sample / 1e6:.2f}M",
                        f"{100 * acc:.2f}%", f"{run_info['seconds']:.0f}s")
        if experts > 1:
            routed_stats = run_info["stats"]
    console.print(results)
    console.print(expert_table(routed_stats, title="expert use over training (summed routing weights per expert)"))
    return 0
