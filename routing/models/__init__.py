"""Registered networks built from condmoe's routed layers.

Each module listed in ``_MODEL_MODULES`` registers its families with
``@register_model(name, sizes, options=<its options dataclass>)`` when imported;
add a new family's module here.
"""

import importlib

from .registry import ModelFamily, build_model, list_models, model_families, model_family, register_model

_MODEL_MODULES: tuple[str, ...] = (
    "condconv_cnn", "basisnet_cnn", "coe_cnn", "cigt_lenet", "topk_moe_cnn",
    "condconv_efficientnet", "condconv_mobilenet_v1", "condconv_mobilenet_v2", "basisnet_mobilenet_v3",
    "coe_mobilenet", "cigt_resnet", "baselines",
)

for _name in _MODEL_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["ModelFamily", "build_model", "list_models", "model_families", "model_family", "register_model"]
