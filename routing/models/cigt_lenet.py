"""cigt_lenet: the CIGT paper's Fashion-MNIST network (arXiv 2402.08345), a [1, 2, 4] LeNet trellis.

"small" is the paper's network: conv 5x5 32 (+ max pool) -> [2 paths] conv 5x5 32
(+ max pool) -> [4 paths] conv 1x1 32, FC 128, FC 64, one classifier head per leaf;
routers with FC 128 and pool strides [2, 1] (at 28x28 input: pooled to 7x7 both
times, written as adaptive pools so other input sizes work). "tiny" halves
every width; "base" doubles the routed layers' widths (the shared first layer
stays). Each block: conv, batch norm (our choice), ReLU, 2x2 max pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..cigt import CIGT, CIGTConfig, CIGTRouter, GridPool, MaxPool2x2
from ..norm import make_norm
from .registry import config_kwargs, register_model

# conv channels per layer, leaf FC widths, router hidden width
SIZES = {
    "tiny": {"channels": (16, 16, 16), "fc": (64, 32), "router_hidden": 64},
    "small": {"channels": (32, 32, 32), "fc": (128, 64), "router_hidden": 128},
    "base": {"channels": (32, 64, 64), "fc": (256, 128), "router_hidden": 128},
}
_LEAF_POOL = 7  # the leaf conv sees a 7x7 map at 28x28 input (two 2x2 max pools)
_ROUTER_POOL = (7, 7)  # AvgPool stride 2 on 14x14, stride 1 on 7x7


def _conv_block(c_in: int, c_out: int, kernel: int, norm: str, pool: bool) -> nn.Sequential:
    # 'batch' | 'none': the routers' batch norm follows the same choice (cigt_lenet's builder)
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2),
                               make_norm(norm, c_out, kinds=("batch", "none")), nn.ReLU()]
    if pool:
        layers.append(MaxPool2x2())
    return nn.Sequential(*layers)


def _leaf(c_in: int, c: int, fc: tuple[int, int], num_classes: int, norm: str, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        _conv_block(c_in, c, 1, norm, pool=False), GridPool(_LEAF_POOL), nn.Flatten(),
        nn.Linear(c * _LEAF_POOL * _LEAF_POOL, fc[0]), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(fc[0], fc[1]), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(fc[1], num_classes),
    )


@dataclass(frozen=True)
class CigtLenetOptions:
    """cigt_lenet's options (job file: ``model.options``); the first four shape the network,
    the rest are CIGTConfig fields (shared/METHODS.md: information gain, temperature schedule)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt option is an error (pydantic reads this)

    paths: tuple[int, ...] | None = None  # the trellis, e.g. (1, 2, 4) or (1, 4): first 1, last = experts
    norm: str = "batch"  # 'batch' | 'none' after each conv (batch norm is our choice)
    dropout: float = 0.0  # dropout in each leaf's FC layers
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


@register_model("cigt_lenet", tuple(SIZES), options=CigtLenetOptions)
def cigt_lenet(size: str, *, num_classes: int = 10, in_channels: int = 1, experts: int | None = None,
               options: CigtLenetOptions = CigtLenetOptions()) -> CIGT:
    """experts: number of leaf paths (default 4: paths (1, 2, 4)); ``options.paths`` gives the whole
    trellis instead (the last layer is the leaf layer, the first must be 1). No ``ep_size``: CIGT's
    paths are small blocks trained data-parallel, not spread experts."""
    paths = options.paths
    if paths is None:
        leaves = 4 if experts is None else int(experts)
        paths = (1, max(1, leaves // 2), leaves)
    paths = tuple(int(k) for k in paths)
    if experts is not None and int(experts) != paths[-1]:
        raise ValueError(f"cigt_lenet experts={experts} must equal the leaf count paths[-1]={paths[-1]}")
    config = CIGTConfig(**{**config_kwargs(options, CIGTConfig), "paths": paths})
    spec = SIZES[size]
    channels, n_layers = spec["channels"], len(paths)
    if n_layers > 3:
        raise ValueError(f"cigt_lenet has at most 3 layers, got paths={paths}")
    layers, routers = [], []
    c_in = in_channels
    for l, k in enumerate(paths):
        c = channels[3 - n_layers + l]
        if l == n_layers - 1:
            blocks = [_leaf(c_in, c, spec["fc"], num_classes, options.norm, options.dropout) for _ in range(k)]
        else:
            blocks = [_conv_block(c_in, c, 5, options.norm, pool=True) for _ in range(k)]
            routers.append(CIGTRouter(c, paths[l + 1], hidden=spec["router_hidden"], pool_size=_ROUTER_POOL[l],
                                      dropout=options.router_dropout, norm=options.norm == "batch"))
        layers.append(nn.ModuleList(blocks))
        c_in = c
    return CIGT(layers, routers, config, num_classes=num_classes)
