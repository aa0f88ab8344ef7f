"""condmoe.routing: soft parameter routing and hard expert selection (pure torch).

Soft: CondConv2d (+ its block and router), BasisNet. Hard: CoE, CIGT, TopKMoE.
Every routed module records RoutingStats, collected with collect_routing_stats.
"""

from .basisnet import BasisNet, BasisNetConfig
from .cigt import CIGT, CIGTConfig, CIGTRouter
from .coe import CoE, CoEConfig, Delegator
from .cond_conv2d import CondConv2d
from .cond_conv_block import CondConvInvertedResidual, CondConvRouter
from .early_exit import tune_exit_threshold
from .expert_parallel import ExpertParallelExperts
from .info_gain import information_gain, information_gain_loss
from .macs import count_macs
from .model_output import ModelOutput
from .models.registry import build_model, list_models, model_families, model_family, register_model
from .routing_output import (
    RoutedModule,
    RoutingOutput,
    RoutingStats,
    accumulate_stats,
    collect_routing_stats,
)
from .topk_moe import ImageExpert, TopKMoE

__all__ = [
    "BasisNet",
    "BasisNetConfig",
    "CIGT",
    "CIGTConfig",
    "CIGTRouter",
    "CoE",
    "CoEConfig",
    "CondConv2d",
    "CondConvInvertedResidual",
    "CondConvRouter",
    "Delegator",
    "ExpertParallelExperts",
    "ImageExpert",
    "ModelOutput",
    "RoutedModule",
    "RoutingOutput",
    "RoutingStats",
    "TopKMoE",
    "accumulate_stats",
    "build_model",
    "collect_routing_stats",
    "count_macs",
    "information_gain",
    "information_gain_loss",
    "list_models",
    "model_families",
    "model_family",
    "register_model",
    "tune_exit_threshold",
]
