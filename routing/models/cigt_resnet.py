"""cigt_resnet: a CIFAR-size (32x32 RGB) ResNet trellis with [1, 2, 4] paths (CIGT, arXiv 2402.08345).

Bicici, Meral, Akarun, "Conditional Information Gain Trellis". Built on
:class:`condmoe.routing.cigt.CIGT`. The layout follows the authors' CIFAR-10
configuration (ufukcbicici/cigt: cifar10_resnet_cigt_entry.py and
configs/cifar10_resnet_cigt_configs.py, read for the architecture only):

- CIFAR ResNet basic blocks (He et al., arXiv 1512.03385: 3x3 conv / BN / ReLU /
  3x3 conv / BN, identity shortcut, 1x1 conv + BN shortcut where the shape changes).
- "resnet110" is the authors' trellis, 54 blocks along every path (ResNet-110
  depth): layer 0 (1 path): stem 3x3 conv to 16 + 9 blocks of 16 channels at
  32x32; layer 1 (2 paths): 9 blocks of 12 channels at 32x32, then 18 blocks of
  16 at 16x16; layer 2 (4 paths): 18 blocks of 16 at 8x8, GAP, one FC head per
  leaf. Its thin paths keep one sample's compute near a quarter of the "thick"
  ResNet-110 baseline (16/32/64 channels).
- routers: the paper's pool -> FC(128) -> ReLU -> Dropout(0.5) -> BN -> FC(K) with
  average-pool strides [4, 2] (written as a pool to 8x8 on 32x32 and 16x16 maps).
  The authors' later code also tries attention (CBAM) layers in the routers; not built.
- "small" (3 + (3 + 3) + 3 blocks per path) and "tiny" (1 + (1 + 1) + 1) keep
  that shape at lower depth, for CPU runs and tests.

``experts`` is the leaf count (default 4: paths (1, 2, 4)); ``experts=1`` gives
paths (1, 1, 1): one path of the same shape, the authors' "thin baseline" (its
routers choose among one path and cost 0.2% of the multiply-adds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cigt import CIGT, CIGTConfig, CIGTRouter
from .registry import config_kwargs, register_model

# per layer: (blocks, channels, stride of the first block) segments
SIZES: dict[str, tuple[tuple[tuple[int, int, int], ...], ...]] = {
    "tiny": (((1, 16, 1),), ((1, 12, 1), (1, 16, 2)), ((1, 16, 2),)),
    "small": (((3, 16, 1),), ((3, 12, 1), (3, 16, 2)), ((3, 16, 2),)),
    "resnet110": (((9, 16, 1),), ((9, 12, 1), (18, 16, 2)), ((18, 16, 2),)),
}
STEM_CHANNELS = 16
ROUTER_POOL = 8  # AvgPool stride 4 on 32x32 (after layer 0), stride 2 on 16x16 (after layer 1)


class BasicBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H/stride, W/stride): two 3x3 conv / BN, residual, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class LeafHead(nn.Module):
    """(B, C, H, W) -> logits (B, K): global average pool and a fully connected classifier."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(h.mean(dim=(2, 3))))


def _segments(c_in: int, segments: tuple[tuple[int, int, int], ...]) -> tuple[list[nn.Module], int]:
    blocks: list[nn.Module] = []
    for n, c, stride in segments:
        for i in range(n):
            blocks.append(BasicBlock(c_in, c, stride if i == 0 else 1))
            c_in = c
    return blocks, c_in


@dataclass(frozen=True)
class CigtResnetOptions:
    """cigt_resnet's options (job file: ``model.options``); the first four shape the network,
    the rest are CIGTConfig fields (shared/METHODS.md section 4: information gain, temperature schedule)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    paths: tuple[int, ...] | None = None  # the trellis, 3 layers, e.g. (1, 2, 4): first 1, last = experts
    dropout: float = 0.0  # dropout before each leaf's classifier
    router_hidden: int = 128  # width of each router's hidden FC layer
    router_dropout: float = 0.5  # dropout in each router's FC
    info_gain_weight: float = 1.0  # lambda: weight of the information-gain routing loss
    info_gain_beta: float = 1.0  # beta: weight of the path-balance entropy term in that loss
    warmup_steps: int = 0  # training iterations of random routing before the routers decide
    initial_temperature: float = 25.0  # routing softmax temperature T at step 0
    temperature_decay: float = 0.9999  # T *= this every training step, (0, 1]
    min_temperature: float = 0.1  # T's floor
    random_path_fraction: float = 0.0  # share of samples sent to a random path after warm-up (training only)
    execution: str = "gather"  # 'gather' (each path runs on its samples only) | 'dense' (every path on all)
    detach_router_input: bool = False  # True: the IG loss trains only the routers, not the features below


@register_model("cigt_resnet", tuple(SIZES), options=CigtResnetOptions)
def cigt_resnet(size: str, *, num_classes: int = 10, in_channels: int = 3, experts: int | None = None,
                options: CigtResnetOptions = CigtResnetOptions()) -> CIGT:
    """experts: leaf paths (default 4: paths (1, 2, 4); 1: the single-path thin baseline); ``options.paths``
    gives the whole 3-layer trellis instead. No ``ep_size``: CIGT's paths are trained data-parallel."""
    paths = options.paths
    if paths is None:
        leaves = 4 if experts is None else int(experts)
        paths = (1, max(1, leaves // 2), leaves)
    paths = tuple(int(k) for k in paths)
    if len(paths) != 3:
        raise ValueError(f"cigt_resnet has 3 layers: paths must have 3 entries, got {paths}")
    if experts is not None and int(experts) != paths[-1]:
        raise ValueError(f"cigt_resnet experts={experts} must equal the leaf count paths[-1]={paths[-1]}")
    config = CIGTConfig(**{**config_kwargs(options, CIGTConfig), "paths": paths})
    spec = SIZES[size]
    layers, routers = [], []
    c_in = in_channels
    for l, k in enumerate(paths):
        path_blocks = []
        for _ in range(k):
            blocks, c_out = _segments(STEM_CHANNELS if l == 0 else c_in, spec[l])
            if l == 0:
                blocks = [nn.Conv2d(in_channels, STEM_CHANNELS, 3, 1, 1, bias=False), nn.BatchNorm2d(STEM_CHANNELS),
                          nn.ReLU(inplace=True), *blocks]
            if l == len(paths) - 1:
                blocks.append(LeafHead(c_out, num_classes, options.dropout))
            path_blocks.append(nn.Sequential(*blocks))
        layers.append(nn.ModuleList(path_blocks))
        c_in = c_out
        if l < len(paths) - 1:
            routers.append(CIGTRouter(c_out, paths[l + 1], hidden=options.router_hidden, pool_size=ROUTER_POOL,
                                      dropout=options.router_dropout))
    model = CIGT(layers, routers, config, num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def thick_resnet110(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """The authors' "thick" baseline: ResNet-110 (16/32/64 channels, 18 blocks each), (B, 3, 32, 32) -> (B, K)."""
    blocks, c = _segments(STEM_CHANNELS, ((18, 16, 1), (18, 32, 2), (18, 64, 2)))
    return nn.Sequential(nn.Conv2d(in_channels, STEM_CHANNELS, 3, 1, 1, bias=False), nn.BatchNorm2d(STEM_CHANNELS),
                         nn.ReLU(inplace=True), *blocks, LeafHead(c, num_classes))
