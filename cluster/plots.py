"""PNG plots and a text summary of a finished (or running) run, from its Parquet log.

Plots (matplotlib, Agg backend, no display needed): expert load share over
time per layer (a heatmap: steps x experts), load imbalance (max/mean) and
routing entropy (0..1) per layer, routing diversity across images (soft
routing: diversity.png), training loss, evaluation accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .parquet_log import read_routing, read_train, routing_totals  # noqa: E402

log = logging.getLogger(__name__)


def _layers(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["layer"], []).append(r)
    return out


def plot_expert_load(rows: list[dict], path: Path) -> Path:
    """One heatmap per layer: x = step, y = expert, colour = that expert's share of the layer's load."""
    layers = _layers(rows)
    n = max(1, len(layers))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n + 0.6), squeeze=False)
    for ax, (name, lrows) in zip(axes[:, 0], layers.items()):
        load = np.array([r["load"] for r in lrows], dtype=np.float64)          # (reports, E)
        share = load / np.clip(load.sum(axis=1, keepdims=True), 1e-30, None)
        steps = [r["step"] for r in lrows]
        im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", vmin=0.0,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[1] - 0.5),
                       interpolation="nearest")
        ax.set_ylabel("expert")
        ax.set_title(f"{name} ({lrows[0]['kind']}): load share per expert", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    if not layers:
        axes[0, 0].text(0.5, 0.5, "no routed layers", ha="center", va="center")
    axes[-1, 0].set_xlabel("step")
    return _save(fig, path)


def _per_layer_lines(rows: list[dict], key: str, ylabel: str, path: Path, ylim=None) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, lrows in _layers(rows).items():
        ax.plot([r["step"] for r in lrows], [r[key] for r in lrows], label=name, marker="." if len(lrows) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if rows:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _diversity_plot(rows: list[dict], path: Path) -> list[Path]:
    """Soft-routed layers only: per-image mixture diversity (solid) and mean mixture entropy (dashed)
    over the steps; no plot when no layer records per-image weights."""
    rows = [r for r in rows if r.get("diversity") is not None]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (name, lrows) in enumerate(_layers(rows).items()):
        color = f"C{i % 10}"
        steps = [r["step"] for r in lrows]
        ax.plot(steps, [r["diversity"] for r in lrows], color=color, label=f"{name} diversity")
        ax.plot(steps, [r["mixture_entropy"] for r in lrows], color=color, linestyle="--", alpha=0.6,
                label=f"{name} mixture entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("diversity (solid), mixture\nentropy (dashed), 0..1", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("routing diversity across images (0: the same mixture for every image)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    return [_save(fig, path)]


def _scalar(rows: list[dict], key: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if pts:
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None)
    else:
        ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[list[Path], str]:
    """Write the PNGs into ``out_dir`` (default <run>/report) and return (paths, text summary)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    routing = read_routing(run_dir).to_pylist()
    train = read_train(run_dir).to_pylist()
    paths = [
        plot_expert_load(routing, out / "expert_load.png"),
        _per_layer_lines(routing, "imbalance", "load imbalance (max/mean)", out / "imbalance.png"),
        _per_layer_lines(routing, "entropy", "routing entropy (0..1)", out / "entropy.png", ylim=(0, 1.05)),
        *_diversity_plot(routing, out / "diversity.png"),
        _scalar(train, "loss", "training loss", out / "loss.png"),
        _scalar(train, "eval_accuracy", "eval accuracy", out / "accuracy.png"),
    ]
    return paths, summary(run_dir, train)


def summary(run_dir: Path, train: list[dict] | None = None) -> str:
    """A few lines: steps, loss first -> last, last accuracy, per-layer imbalance/entropy/drops/exits."""
    train = train if train is not None else read_train(run_dir).to_pylist()
    lines = [f"run {run_dir}"]
    if train:
        last_eval = [r for r in train if r.get("eval_accuracy") is not None]
        lines.append(f"steps: {train[-1]['step']}  loss: {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}")
        if last_eval:
            e = last_eval[-1]
            extra = f", {e['eval_macs_per_sample'] / 1e6:.3f}M MAdds/sample" if e.get("eval_macs_per_sample") else ""
            lines.append(f"eval accuracy at step {e['step']}: {100 * e['eval_accuracy']:.2f}%{extra}")
    for name, s in routing_totals(run_dir).items():
        mix = "" if s.diversity is None else \
            f", diversity {s.diversity:.3f}, mixture entropy {s.mixture_entropy:.2f}"
        lines.append(f"{name} ({s.kind}, {s.num_experts} experts): imbalance {s.imbalance:.2f}, "
                     f"entropy {s.entropy:.2f}{mix}, samples {s.samples}, dropped {s.dropped}, "
                     f"early exits {s.early_exits}")
    return "\n".join(lines)
