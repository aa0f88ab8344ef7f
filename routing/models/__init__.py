"""Registered networks built from condmoe's routed layers."""

from .registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
