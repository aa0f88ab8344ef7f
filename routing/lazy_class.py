"""Classes defined on first use, published under a module-level name.

routing/ subclasses DeepSpeed's MoE layers, but ``import condmoe.routing`` must
stay torch-only; so the subclass is made inside a function the first time a
model needs it. Models must still pickle by reference (Ray ships them, tests
deep-copy them), so the class gets a module-level name that the module's
``__getattr__`` serves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def lazy_class(module: str, name: str, make: Callable[[], type]) -> Callable[[], type]:
    """A cached getter for the class ``make()`` returns, renamed to ``module.name``."""

    @functools.cache
    def get() -> type:
        cls = make()
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = module
        return cls

    return get


def module_getattr(module: str, classes: dict[str, Callable[[], type]]) -> Callable[[str], type]:
    """A module ``__getattr__`` serving the lazily made classes by their published names."""

    def __getattr__(name: str) -> type:
        if name in classes:
            return classes[name]()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
