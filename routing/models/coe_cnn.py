"""coe_cnn: CoE (arXiv 2107.03815) with a small strided-CNN delegator and E CNN experts of one size.

Every expert is a whole image classifier of the named size (the "dense network
of size S" CoE is compared against is one such expert, :class:`ExpertCNN`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from ..coe import CoE, CoEConfig, Delegator
from ..norm import make_norm
from .registry import config_kwargs, register_model

# expert conv channels (strides 2, 2, 1); delegator channels (all stride 2)
EXPERT_CHANNELS = {"tiny": (16, 32, 64), "small": (32, 64, 128), "base": (48, 96, 192)}
DELEGATOR_CHANNELS = {"tiny": (16, 32), "small": (16, 32), "base": (16, 32, 64)}


class ExpertCNN(nn.Module):
    """(B, C, H, W) -> (B, num_classes): 3x3 conv / norm / ReLU stages (strides 2, 2, then 1), GAP, FC."""

    def __init__(self, channels: tuple[int, ...], *, in_channels: int, num_classes: int, dropout: float = 0.1,
                 norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for i, out_ch in enumerate(channels):
            layers += [nn.Conv2d(ch, out_ch, 3, 2 if i < 2 else 1, 1, bias=False), make_norm(norm, out_ch),
                       nn.ReLU(inplace=True)]
            ch = out_ch
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.body(x).mean(dim=(2, 3))))


@dataclass(frozen=True)
class CoECnnOptions:
    """coe_cnn's options (job file: ``model.options``); the first four shape the network,
    the rest are CoEConfig fields (shared/METHODS.md: WGM, LGM, VCM)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    dropout: float = 0.1  # each expert's dropout before its classifier
    norm: str = "batch"  # 'batch' | 'group' | 'none' in delegator and experts ('group': batch-independent)
    delegator_scale: float = 1.0  # the delegator sees the image downscaled by this factor, (0, 1]
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


@register_model("coe_cnn", tuple(EXPERT_CHANNELS), options=CoECnnOptions)
def coe_cnn(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int = 4, ep_size: int = 1,
            options: CoECnnOptions = CoECnnOptions()) -> CoE:
    """experts = E whole-network experts, spread over ``ep_size`` workers (expert parallelism)."""
    config = CoEConfig(num_experts=experts, ep_size=ep_size, **config_kwargs(options, CoEConfig))
    make_expert = partial(ExpertCNN, EXPERT_CHANNELS[size], in_channels=in_channels, num_classes=num_classes,
                          dropout=options.dropout, norm=options.norm)
    delegator = Delegator(in_channels, num_classes, experts, DELEGATOR_CHANNELS[size],
                          learned_vcm=config.vcm == "learned", norm=options.norm,
                          input_scale=options.delegator_scale)
    return CoE(delegator, make_expert, config, num_classes=num_classes, seed=options.seed)
