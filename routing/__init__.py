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

# hard expert selection (issue 3)
from .cigt import CIGT, CIGTConfig, CIGTRouter  # noqa: E402
from .coe import CoE, CoEConfig, Delegator  # noqa: E402
from .expert_parallel import ExpertParallelExperts  # noqa: E402
from .info_gain import information_gain, information_gain_loss  # noqa: E402
from .topk_moe import ImageExpert, TopKMoE  # noqa: E402

__all__ += ["CIGT", "CIGTConfig", "CIGTRouter", "CoE", "CoEConfig", "Delegator", "ExpertParallelExperts",
            "ImageExpert", "TopKMoE", "information_gain", "information_gain_loss"]
