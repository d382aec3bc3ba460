"""Width-scaled sub-models cut from one global model, and the element-wise average that merges them back.

A zoo model built at width w has the full model's state-dict keys, each tensor narrower in its hidden
dimensions (see `build_model`). A client's sub-model takes, in every dimension of every tensor, a
window of that dimension's channels: the leading ones (HeteroFL) or ones that roll with the round
(FedRolex). Dimensions the width leaves alone (image channels, classes, kernel sizes) are taken whole.
"""

from __future__ import annotations

import torch

from neulite.algorithms.merge import merge
from neulite.algorithms.payload import ClientResult
from neulite.config import Config, ServerConfig
from neulite.models.arrays import Arrays
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model

WIDTHS = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)  # capacity levels, widest first


def width_net(cfg: Config, like: StageNet, width: float) -> StageNet:
    """The configured zoo model at `width` times the configured width, for `like`'s inputs and classes."""
    model = like.model
    return StageNet(
        build_model(cfg.model.name, model.input_shape, model.num_classes, cfg.model.width * width, cfg.model.blocks)
    )


def window(full: int, size: int, offset: int) -> torch.Tensor:
    """`size` of a dimension's `full` channels from `offset` on, wrapping around; a whole dimension keeps its order."""
    if size == full:
        return torch.arange(full)
    return (offset + torch.arange(size)) % full


def _grid(full: torch.Size, sub: torch.Size, offset: int) -> tuple[torch.Tensor, ...]:
    """Broadcastable per-dimension indices: `t[grid]` is the sub-tensor at their cross product."""
    d = len(full)
    return tuple(
        window(f, s, offset).view([-1 if j == i else 1 for j in range(d)])
        for i, (f, s) in enumerate(zip(full, sub, strict=True))
    )


def extract(state: Arrays, shapes: dict[str, torch.Size], offset: int) -> Arrays:
    """A sub-model's tensors: each name in `shapes` cut out of the global tensor at the windows from `offset`."""
    return {name: state[name][_grid(state[name].shape, shape, offset)] for name, shape in shapes.items()}


def scatter_average(state: Arrays, results: list[ClientResult], offset: int, rule: ServerConfig) -> Arrays:
    """Every element merged (by `rule`) over the clients whose sub-model held it.

    Elements that no client trained keep their value in `state`. Returns the merged full tensors.
    """
    merged: Arrays = {}
    for name in results[0].arrays:
        old = state[name]
        placed = []
        for r in results:
            value = torch.full(old.shape, float("nan"), dtype=torch.float64)
            value[_grid(old.shape, r.arrays[name].shape, offset)] = r.arrays[name].double()
            placed.append(value)
        average = merge(placed, [r.num_examples for r in results], rule)
        merged[name] = torch.where(average.isnan(), old.double(), average).to(old.dtype)
    return merged
