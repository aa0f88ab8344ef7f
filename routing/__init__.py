"""condmoe.routing: soft parameter routing and hard expert selection (pure torch)."""

from .model_output import ModelOutput
from .models.registry import build_model, list_models, register_model
from .routing_output import (
    RoutedModule,
    RoutingOutput,
    RoutingStats,
    accumulate_stats,
    collect_routing_stats,
)

__all__ = [
    "ModelOutput",
    "RoutedModule",
    "RoutingOutput",
    "RoutingStats",
    "accumulate_stats",
    "build_model",
    "collect_routing_stats",
    "list_models",
    "register_model",
]
