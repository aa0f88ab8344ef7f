"""``condmoe sweep report SWEEP``: accuracy beside cost, the way the conditional-computation papers show it.

From a sweep's trials.parquet (condmoe.cluster.sweep): a table with the mean
and standard deviation over seeds of every variant (summary.md, summary.csv)
and PNG plots (matplotlib, Agg):

- ``accuracy_vs_madds.png``: accuracy against multiply-adds per image, one
  point per variant (error bars: std over seeds), the Pareto front (the points,
  variants' and exit curves', that nothing beats on both cost and accuracy)
  drawn as a line, static
  baselines (no routed layer with more than one expert) as hollow squares,
  early-exit curves (mean over seeds, from each trial's exit_curve.json) as
  lines with their thresholds;
- ``params_vs_accuracy.png``: parameters against accuracy, one point per variant;
- ``diversity.png``: routing diversity across images per variant (soft routing only).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .sweep import read_table  # noqa: E402

log = logging.getLogger(__name__)

# row keys that are results, not what distinguishes a variant
RESULT_KEYS = {"sweep", "trial", "run", "seed", "model", "size", "experts", "steps", "accuracy", "eval_samples",
               "macs_per_sample", "exit_rate", "params", "wall_s", "train_s", "images_per_s", "routed_layers",
               "static", "routing_diversity", "run_dir", "checkpoint", "exit_curve", "full_accuracy",
               "light_accuracy"}
STATS = ("accuracy", "macs_per_sample", "exit_rate", "params", "wall_s", "images_per_s", "routing_diversity")


def _mean_std(values: list) -> tuple[float | None, float | None]:
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def variant_keys(rows: list[dict]) -> list[str]:
    """The varied keys: every row key that is not a result (variant, grid keys), in column order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in RESULT_KEYS and k not in keys]
    return keys


def _label(row: dict, keys: list[str]) -> str:
    parts = [str(row["variant"])] if "variant" in keys and row.get("variant") is not None else []
    parts += [f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys if k != "variant" and row.get(k) is not None]
    return " ".join(parts) or str(row.get("model", "job"))


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per variant (rows grouped by every varied key but the seed): mean/std of the results."""
    keys = variant_keys(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(json.dumps(r.get(k), default=str) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        entry = {"label": _label(first, keys), **{k: first.get(k) for k in keys}, "model": first.get("model"),
                 "seeds": len(members), "static": bool(first.get("static")),
                 "curves": [m["exit_curve"] for m in members if m.get("exit_curve")]}
        for key in STATS:
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([m.get(key) for m in members])
        out.append(entry)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) no other point beats on both (cheaper-or-equal and more
    accurate, or strictly cheaper and as accurate), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def mean_curve(paths: list[str]) -> list[dict] | None:
    """The exit curves of one variant's seeds averaged per threshold (accuracy, MAdds, exit rate)."""
    curves = []
    for p in paths:
        try:
            curves.append(json.loads(Path(p).read_text())["curve"])
        except (OSError, ValueError, KeyError):
            log.warning("exit curve %s unreadable; left out", p)
    if not curves:
        return None
    by_t: dict[float, list[dict]] = {}
    for c in curves:
        for point in c:
            by_t.setdefault(point["threshold"], []).append(point)
    return [{"threshold": t, **{k: sum(p[k] for p in pts) / len(pts)
                                for k in ("accuracy", "macs_per_sample", "exit_rate")}}
            for t, pts in sorted(by_t.items())]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_madds(variants: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    pts = [(v["macs_per_sample_mean"] / 1e6, 100 * v["accuracy_mean"]) for v in variants
           if v["macs_per_sample_mean"] is not None and v["accuracy_mean"] is not None]
    shown = [v for v in variants if v["macs_per_sample_mean"] is not None and v["accuracy_mean"] is not None]
    candidates = list(pts)  # the front runs over the variants and every point of their exit curves
    for i, v in enumerate(shown):
        curve = mean_curve(v["curves"])
        color = f"C{i % 10}"
        if curve:
            xs = [c["macs_per_sample"] / 1e6 for c in curve]
            ys = [100 * c["accuracy"] for c in curve]
            candidates += list(zip(xs, ys))
            ax.plot(xs, ys, "-", color=color, alpha=0.55, linewidth=1.2, marker=".", markersize=4,
                    label=f"{v['label']}: early exit")
            for c, x, y in zip(curve, xs, ys):
                if c["threshold"] in (0.5, 0.9):
                    ax.annotate(f"t={c['threshold']:g}", (x, y), fontsize=6, color=color,
                                textcoords="offset points", xytext=(3, -8))
        x, y = pts[i]
        yerr = 100 * (v["accuracy_std"] or 0.0)
        ax.errorbar(x, y, yerr=yerr, fmt="s" if v["static"] else "o", color=color, markersize=7,
                    markerfacecolor="white" if v["static"] else color, capsize=3, zorder=3,
                    label=v["label"] + (" (static)" if v["static"] else ""))
        ax.annotate(v["label"], (x, y), fontsize=7, textcoords="offset points", xytext=(5, 4))
    front = pareto_front(candidates)
    if len(front) > 1:
        ax.plot([candidates[i][0] for i in front], [candidates[i][1] for i in front], "--", color="black",
                alpha=0.5, linewidth=1, zorder=2, label="Pareto front")
    elif front:
        ax.scatter([candidates[front[0]][0]], [candidates[front[0]][1]], s=160, facecolors="none",
                   edgecolors="black", label="Pareto front", zorder=2)
    ax.set_xlabel("multiply-adds per image (M)")
    ax.set_ylabel("accuracy on the whole eval split (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.1)
    if shown:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_params_vs_accuracy(variants: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    shown = [v for v in variants if v["params_mean"] and v["accuracy_mean"] is not None]
    for i, v in enumerate(shown):
        x, y = v["params_mean"] / 1e6, 100 * v["accuracy_mean"]
        ax.errorbar(x, y, yerr=100 * (v["accuracy_std"] or 0.0), fmt="s" if v["static"] else "o",
                    color=f"C{i % 10}", markerfacecolor="white" if v["static"] else f"C{i % 10}",
                    markersize=7, capsize=3, label=v["label"] + (" (static)" if v["static"] else ""))
        ax.annotate(v["label"], (x, y), fontsize=7, textcoords="offset points", xytext=(5, 4))
    if shown and max(v["params_mean"] for v in shown) > 8 * min(v["params_mean"] for v in shown):
        ax.set_xscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("accuracy on the whole eval split (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.1)
    if shown:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_diversity(variants: list[dict], path: Path, title: str) -> Path | None:
    shown = [v for v in variants if v["routing_diversity_mean"] is not None]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.8))
    ys = range(len(shown))
    values = [v["routing_diversity_mean"] for v in shown]
    ax.barh(list(ys), values, xerr=[v["routing_diversity_std"] or 0.0 for v in shown], color="C2", capsize=3)
    for y, value in zip(ys, values):
        ax.text(min(value + 0.02, 0.9), y, f"{value:.3f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [v["label"] for v in shown], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("routing diversity across images (0: one mixture for every image, 1: one-hot, balanced)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _fmt(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f} ± {(std or 0.0) * scale:.{digits}f}"


def table_markdown(variants: list[dict]) -> str:
    lines = ["| variant | seeds | accuracy % | MAdds/image (M) | exit rate | params (M) | routing diversity "
             "| wall s | images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        name = v["label"] + (" (static)" if v["static"] else "")
        lines.append(f"| {name} | {v['seeds']} | {_fmt(v['accuracy_mean'], v['accuracy_std'], 100)} "
                     f"| {_fmt(v['macs_per_sample_mean'], v['macs_per_sample_std'], 1e-6, 3)} "
                     f"| {_fmt(v['exit_rate_mean'], v['exit_rate_std'])} "
                     f"| {_fmt(v['params_mean'], v['params_std'], 1e-6, 3)} "
                     f"| {_fmt(v['routing_diversity_mean'], v['routing_diversity_std'], 1, 3)} "
                     f"| {_fmt(v['wall_s_mean'], v['wall_s_std'], 1, 0)} "
                     f"| {_fmt(v['images_per_s_mean'], v['images_per_s_std'], 1, 0)} |")
    return "\n".join(lines)


def exit_summary(paths: list[str]) -> dict | None:
    """One variant's exit curves (its seeds averaged): the full model, the light stage alone, and the
    cheapest threshold whose accuracy stays within 0.3 and within 1 point of the full model's (read on
    the evaluation split: a description of the curve, not a tuned threshold)."""
    data = []
    for p in paths:
        try:
            data.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError):
            continue
    curve = mean_curve(paths)
    if not data or not curve:
        return None

    def mean(part: str, key: str) -> float:
        return sum(d[part][key] for d in data) / len(data)

    out = {"full_accuracy": mean("full", "accuracy"), "full_macs": mean("full", "macs_per_sample"),
           "light_accuracy": mean("light", "accuracy"), "light_macs": mean("light", "macs_per_sample")}
    for drop in (0.003, 0.01):
        ok = [c for c in curve if c["accuracy"] >= out["full_accuracy"] - drop - 1e-12]
        out[f"within_{drop}"] = min(ok, key=lambda c: c["macs_per_sample"]) if ok else None
    return out


def exit_table_markdown(variants: list[dict]) -> str:
    rows = [(v, exit_summary(v["curves"])) for v in variants if v["curves"]]
    rows = [(v, e) for v, e in rows if e is not None]
    if not rows:
        return ""
    lines = ["| variant | full: accuracy %, MAdds (M) | light stage alone | cheapest within 0.3 points "
             "| cheapest within 1 point |", "|---|---|---|---|---|"]

    def point(c: dict | None, full_macs: float) -> str:
        if c is None:
            return "-"
        return (f"t={c['threshold']:g}: {100 * c['accuracy']:.2f}%, {c['macs_per_sample'] / 1e6:.3f}M "
                f"({c['macs_per_sample'] / full_macs:.2f}x), exit {c['exit_rate']:.2f}")

    for v, e in rows:
        lines.append(f"| {v['label']} | {100 * e['full_accuracy']:.2f}%, {e['full_macs'] / 1e6:.3f}M "
                     f"| {100 * e['light_accuracy']:.2f}%, {e['light_macs'] / 1e6:.3f}M "
                     f"({e['light_macs'] / e['full_macs']:.2f}x) | {point(e['within_0.003'], e['full_macs'])} "
                     f"| {point(e['within_0.01'], e['full_macs'])} |")
    return "Early exit (mean curve over seeds, on the evaluation split):\n\n" + "\n".join(lines)


def write_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> tuple[list[Path], str]:
    """Write summary.md, summary.csv and the PNGs into ``out_dir`` (default SWEEP/report);
    returns (paths, the markdown table)."""
    sweep_dir = Path(sweep_dir)
    rows = read_table(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    variants = summarize(rows)
    name = sweep_dir.name
    text = f"sweep {name}: {len(rows)} trials, {len(variants)} variants (mean ± std over seeds)\n\n" \
           + table_markdown(variants)
    exits = exit_table_markdown(variants)
    if exits:
        text += "\n\n" + exits
    (out / "summary.md").write_text(text + "\n")
    _write_csv(variants, out / "summary.csv")
    paths = [out / "summary.md", out / "summary.csv",
             plot_accuracy_vs_madds(variants, out / "accuracy_vs_madds.png", f"{name}: accuracy vs multiply-adds"),
             plot_params_vs_accuracy(variants, out / "params_vs_accuracy.png", f"{name}: parameters vs accuracy")]
    div = plot_diversity(variants, out / "diversity.png", f"{name}: routing diversity (run totals)")
    if div is not None:
        paths.append(div)
    return paths, text


def _write_csv(variants: list[dict], path: Path) -> None:
    import csv

    keys = [k for k in variants[0] if k != "curves"] if variants else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for v in variants:
            w.writerow({k: v[k] for k in keys})
