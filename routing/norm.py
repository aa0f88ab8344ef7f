"""The normalisation after a convolution, chosen by name: 'batch', 'group' or 'none'."""

from __future__ import annotations

from torch import nn

NORMS = ("batch", "group", "none")


def make_norm(norm: str, channels: int, kinds: tuple[str, ...] = NORMS) -> nn.Module:
    """'batch' -> BatchNorm2d; 'group' -> GroupNorm (min(8, channels) groups: per-sample,
    batch-independent); 'none' -> Identity. ``kinds``: the names a caller accepts (a subset of NORMS)."""
    if norm not in kinds:
        *head, last = kinds
        allowed = f"{', '.join(map(repr, head))} or {last!r}" if head else repr(last)
        raise ValueError(f"norm must be {allowed}, got {norm!r}")
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
