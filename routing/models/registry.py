"""Named network families with named sizes and typed options: ``build_model("coe_cnn", "small", experts=4)``.

A family registers its builder with :func:`register_model`, naming its sizes and
its options class: a stdlib dataclass declared next to the builder (megablocks'
one arguments object per family) in which every option has a type, a default
and a comment. Job files name the family as ``model: {name: coe_cnn, size: small,
experts: 4, options: {lgm: argmin}}``; condmoe.trainer.config turns each family
into one member of a union discriminated by ``name``, so a misspelt option
fails when the job file is loaded. An options class sets
``__pydantic_config__ = {"extra": "forbid"}`` (read by pydantic, which validates
stdlib dataclasses; nothing here imports it).

Builder contract: ``builder(size, *, experts, num_classes, in_channels[, ep_size][, options])``.
The network it returns declares ``label_smoothing: float`` (0.0 by default) and applies
it to every cross-entropy against the class targets; ``build_model(label_smoothing=)``
sets it (the trainer's ``optim.label_smoothing``: a recipe choice, not a model option).
A builder with an ``ep_size`` parameter declares expert parallelism (its experts
are deepspeed.moe experts spread over ``ep_size`` workers); the registry rejects
``ep_size > 1`` for the others. A family registered with an options class gets
``options=<instance>``; one without takes no options.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    """One registered family: builder, named sizes, options class (None: no options) and
    whether the builder takes ``ep_size`` (experts spread over an expert-parallel group)."""

    name: str
    builder: Callable[..., nn.Module]
    sizes: tuple[str, ...]
    options: type | None
    expert_parallel: bool

    def make_options(self, options: Any = None, **overrides: Any) -> Any:
        """The family's options object from None, an instance or a mapping, with ``overrides``
        on top; an unknown option raises a ValueError naming it and the known ones."""
        if self.options is None:
            if options or overrides:
                given = sorted({*overrides, *(options if isinstance(options, Mapping) else ())}) or [repr(options)]
                raise ValueError(f"model {self.name!r} takes no options, got {', '.join(given)}")
            return None
        if isinstance(options, self.options):
            base = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        elif options is None or isinstance(options, Mapping):
            base = dict(options or {})
        else:
            raise TypeError(f"model {self.name!r} options must be a {self.options.__name__} or a mapping, "
                            f"got {type(options).__name__}")
        base.update(overrides)
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise ValueError(f"model {self.name!r} has no option {unknown[0]!r}; options: {', '.join(sorted(known))}")
        return self.options(**base)


# name -> family; filled at import by each family's module (routing/models/__init__.py)
_REGISTRY: dict[str, ModelFamily] = {}


def register_model(name: str, sizes: tuple[str, ...], options: type | None = None) -> Callable:
    """Decorator: register ``builder(size, *, experts, num_classes, in_channels[, ep_size][, options])``.

    options: the family's options dataclass (every field with a default), passed to the
    builder as ``options=``; None for a family without options.
    """
    if options is not None:
        if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
            raise TypeError(f"model {name!r}: options must be a dataclass, got {options!r}")
        required = [f.name for f in dataclasses.fields(options)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if required:
            raise TypeError(f"model {name!r}: every option needs a default; {', '.join(required)} has none")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        params = inspect.signature(builder).parameters
        _REGISTRY[name] = ModelFamily(name, builder, tuple(sizes), options, expert_parallel="ep_size" in params)
        return builder

    return wrap


def list_models() -> dict[str, tuple[str, ...]]:
    """{model name: its named sizes}."""
    return {name: fam.sizes for name, fam in sorted(_REGISTRY.items())}


def model_families() -> dict[str, ModelFamily]:
    """Every registered family by name (sorted)."""
    return dict(sorted(_REGISTRY.items()))


def model_family(name: str) -> ModelFamily:
    """The registered family ``name``; an unknown name raises a ValueError listing the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def config_kwargs(options: Any, target: type) -> dict[str, Any]:
    """The values of ``options`` (a dataclass) for the fields the dataclass ``target`` declares:
    how a builder forwards its options into a layer's config (CoEConfig, CIGTConfig, ...)."""
    names = {f.name for f in dataclasses.fields(target)}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name in names}


def build_model(name: str, size: str = "small", *, experts: int | None = None, num_classes: int | None = None,
                in_channels: int | None = None, ep_size: int | None = None, options: Any = None,
                label_smoothing: float = 0.0, **option_overrides: Any) -> nn.Module:
    """Build a registered network; arguments left None take the builder's defaults.

    options: the family's options object or a mapping of its fields; further keyword
    arguments are options too (``build_model("coe_cnn", "tiny", lgm="argmin")``).
    label_smoothing: of the network's class-target cross-entropies, in [0, 1).
    Unknown names, sizes or options, and ``ep_size > 1`` for a family without expert
    parallelism, raise a ValueError naming them.
    """
    family = model_family(name)
    if size not in family.sizes:
        raise ValueError(f"model {name!r} has no size {size!r}; sizes: {', '.join(family.sizes)}")
    kwargs: dict[str, Any] = {k: v for k, v in (("experts", experts), ("num_classes", num_classes),
                                                ("in_channels", in_channels)) if v is not None}
    if ep_size is not None:
        if family.expert_parallel:
            kwargs["ep_size"] = ep_size
        elif ep_size != 1:
            raise ValueError(f"model {name!r} has no expert-parallel layers: ep_size must be 1, got {ep_size}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    opts = family.make_options(options, **option_overrides)
    if opts is not None:
        kwargs["options"] = opts
    model = family.builder(size, **kwargs)
    if label_smoothing:
        if not isinstance(getattr(model, "label_smoothing", None), float):
            raise ValueError(f"model {name!r} ({type(model).__name__}) declares no label_smoothing attribute")
        model.label_smoothing = float(label_smoothing)
    return model
