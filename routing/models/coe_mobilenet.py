"""coe_mobilenet: CoE with a MobileNetV3-Small delegator and MobileNetV3-Large experts (224x224 RGB).

Zhang, Chen, Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on
ImageNet with 100M FLOPs", ICML 2022, arXiv 2107.03815. Paper figure: 80.7%
top-1 at 194M FLOPs, counted as delegator + ONE expert per image.

Built on :class:`condmoe.routing.coe.CoE` (delegator with selection, rough
prediction and VCM heads; experts as whole networks in the DeepSpeed-MoE
expert-parallel container, so ``ep_size > 1`` spreads them over workers). The
paper's delegator and expert architectures were not available to us (no public
code); our choice, sized to the paper's budget, each an option:

- delegator: MobileNetV3-Small 1.0x (arXiv 1905.02244) previewing the image
  downscaled to 6/7 of its side (192x192 at 224, ``delegator_scale``): 42M
  multiply-adds; its pooled head features (1024) feed the three heads (1M).
  The same preview network as basisnet_mobilenet_v3's lightweight model.
- each expert: MobileNetV3-Large 0.75x at full resolution, 155M.
- total per image: 198M with our counter (paper: 194M, +1.9%); with early exit
  the average is delegator + (1 - exit rate) x expert.
- ``experts=4`` by default (any E: the cost does not depend on it).

``experts=1`` builds one expert network alone (the static baseline of the same
per-image shape, no delegator).
"""

from __future__ import annotations

from dataclasses import dataclass

from functools import partial

from torch import nn

from ..coe import CoE, CoEConfig, Delegator
from .mobilenet import Logits
from .mobilenet_v3 import mobilenet_v3
from .registry import config_kwargs, register_model

SIZES: tuple[str, ...] = ("194m",)
DELEGATOR_SCALE = 6 / 7  # 192x192 at 224x224


class _Features(nn.Module):
    """A MobileNet's pooled features (B, F): the delegator's backbone."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x)


@dataclass(frozen=True)
class CoEMobileNetOptions:
    """coe_mobilenet's options (job file: ``model.options``); the first five shape the network,
    the rest are CoEConfig fields (shared/METHODS.md section 3: WGM, LGM, VCM)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float = 0.2  # each expert's dropout before its classifier
    expert_width: float = 0.75  # channel width of each MobileNetV3-Large expert
    delegator_width: float = 1.0  # channel width of the MobileNetV3-Small delegator
    delegator_scale: float = DELEGATOR_SCALE  # the delegator previews the image resized by this, (0, 1]
    seed: int | None = None  # expert initialisation seed (None: drawn from torch's global generator)
    exit_threshold: float | None = None  # exit when uncertainty <= this at inference, [0, 1] (None: never)
    wgm_floor: float = 0.1  # WGM: floor of every expert's sample weight, [0, 1]
    wgm_temperature: float = 1.0  # WGM: temperature of the weight softmax, > 0
    lgm: str = "balanced"  # LGM labels: 'balanced' (capacity-limited) | 'argmin' (lowest loss)
    lgm_capacity_factor: float = 1.25  # LGM 'balanced': per-expert capacity factor, >= 1
    vcm: str = "learned"  # uncertainty estimate: 'learned' (a delegator head) | 'entropy' (of the rough prediction)
    selection_loss_weight: float = 1.0  # weight of the delegator's expert-selection CE
    rough_loss_weight: float = 0.5  # weight of the delegator's rough-prediction CE
    vcm_loss_weight: float = 0.1  # weight of the learned VCM's loss
    train_routing: str = "dense"  # 'dense' only: every expert sees every training sample (the LGM needs it)


@register_model("coe_mobilenet", SIZES, options=CoEMobileNetOptions)
def coe_mobilenet(size: str, *, experts: int = 4, num_classes: int = 1000, in_channels: int = 3, ep_size: int = 1,
                  options: CoEMobileNetOptions = CoEMobileNetOptions()) -> nn.Module:
    """experts = E whole MobileNetV3-Large experts, spread over ``ep_size`` workers (expert parallelism);
    ``experts=1``: one expert network alone (no delegator)."""
    if experts < 1:
        raise ValueError(f"coe_mobilenet experts must be >= 1, got {experts}")
    make_expert = partial(mobilenet_v3, "large", width=options.expert_width, num_classes=num_classes,
                          in_channels=in_channels, dropout=options.dropout)
    if experts == 1:
        if ep_size != 1:
            raise ValueError(f"coe_mobilenet with one expert has no expert parallelism: ep_size must be 1, "
                             f"got {ep_size}")
        return make_expert()
    config = CoEConfig(num_experts=experts, ep_size=ep_size, **config_kwargs(options, CoEConfig))
    body = mobilenet_v3("small", width=options.delegator_width, num_classes=num_classes, in_channels=in_channels)
    body.classifier = nn.Identity()  # the delegator has its own heads
    delegator = Delegator(in_channels, num_classes, experts, (), learned_vcm=config.vcm == "learned",
                          input_scale=options.delegator_scale, backbone=_Features(body),
                          backbone_features=body.head.conv.out_channels)
    return CoE(delegator, lambda: Logits(make_expert()), config, num_classes=num_classes, seed=options.seed)
