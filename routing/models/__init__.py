"""Registered networks built from condmoe's routed layers.

Each module listed in ``_MODEL_MODULES`` registers its families with
``@register_model`` when imported; add a new family's module here.
"""

import importlib

from .registry import build_model, list_models, register_model

_MODEL_MODULES: tuple[str, ...] = ("condconv_cnn", "basisnet_cnn", "coe_cnn", "cigt_lenet", "topk_moe_cnn")

for _name in _MODEL_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["build_model", "list_models", "register_model"]
