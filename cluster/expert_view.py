"""Terminal view of expert use: one row per routed layer, one shaded cell per expert."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from condmoe.routing import RoutingStats

_SHADES = " ▁▂▃▄▅▆▇█"


def _heat(fraction: list[float]) -> Text:
    """One block character per expert, height = that expert's share relative to the largest."""
    top = max(fraction) if fraction and max(fraction) > 0 else 1.0
    text = Text()
    for f in fraction:
        level = int(round(f / top * (len(_SHADES) - 1)))
        text.append(_SHADES[level], style="bold green" if level >= 6 else "green")
    return text


def expert_table(stats: dict[str, RoutingStats], title: str = "expert use") -> Table:
    """A rich Table: layer, kind, samples, per-expert load shares, imbalance, entropy, drops, exits,
    and for layers that record per-image weights (soft routing) their diversity and mixture entropy
    ("-" elsewhere): diversity 0 means every image gets the same mixture, i.e. no conditioning."""
    table = Table(title=title, title_justify="left")
    for col, justify in [("layer", "left"), ("kind", "left"), ("samples", "right"), ("load per expert", "left"),
                         ("shares %", "left"), ("imbalance", "right"), ("entropy", "right"),
                         ("diversity", "right"), ("mix entropy", "right"),
                         ("dropped", "right"), ("early exits", "right")]:
        table.add_column(col, justify=justify)
    for name, s in stats.items():
        frac = s.fraction.tolist()
        shares = " ".join(f"{100 * f:.0f}" for f in frac) if len(frac) <= 16 else f"{len(frac)} experts"
        table.add_row(name, s.kind, str(s.samples), _heat(frac), shares, f"{s.imbalance:.2f}",
                      f"{s.entropy:.2f}", _ratio(s.diversity), _ratio(s.mixture_entropy),
                      str(s.dropped), str(s.early_exits))
    return table


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
