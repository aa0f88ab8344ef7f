"""Named network families with named sizes: ``build_model("condconv_cnn", "small", experts=8)``.

A family registers a builder with :func:`register_model`; job files name it as
``model: {name: condconv_cnn, size: small, experts: 8}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# name -> (builder(size, **kwargs) -> nn.Module, sizes)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {}


def register_model(name: str, sizes: tuple[str, ...]) -> Callable:
    """Decorator: register ``builder(size: str, **options) -> nn.Module`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = (builder, tuple(sizes))
        return builder

    return wrap


def list_models() -> dict[str, tuple[str, ...]]:
    """{model name: its named sizes}."""
    return {name: sizes for name, (_, sizes) in sorted(_REGISTRY.items())}


def build_model(name: str, size: str = "small", **options: Any) -> nn.Module:
    """Build a registered network; unknown names or sizes raise a ValueError naming them."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    builder, sizes = _REGISTRY[name]
    if size not in sizes:
        raise ValueError(f"model {name!r} has no size {size!r}; sizes: {', '.join(sizes)}")
    return builder(size, **options)
