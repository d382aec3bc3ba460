"""Training scaffolding that progressive training adds around the blocks.

An output module Op_t stands in for the blocks t+1..T that a stage-t client does not hold: one light
layer per missing block with that block's channel count, then a freshly initialised classifier of the
real head's shape (the Harmonizer's forward part). The projection MLP P_t only feeds the Mentor's
label-dependence term. Both are dropped after training.

Both are sized to stay a small part of a stage's memory whatever the network: with blocks of one
conv each, light layers that copied every missing block's shape would cost as much as the blocks a
stage skips, and progressive training would save nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neulite.models.blocks import BlockModel, channels, fresh_head, global_pool

LIGHT_SHARE = 0.25
"""A light layer is the reference's strided 3x3 conv only while that has at most this share of the
parameters of the block it stands in for (true of blocks of several layers, whose activations it
then also undercuts); otherwise it is a compact layer."""


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def light_layer(in_shape: Sequence[int], out_shape: Sequence[int], compact: bool = False) -> nn.Module:
    """One layer + norm + ReLU from in to out shape, standing in for a block.

    Feature maps: the reference's strided 3x3 conv (adaptive pooling when no stride hits the shape)
    or, compact, pooling to the output resolution first and a depthwise-separable 3x3 conv there
    (about 9x fewer weights, activations only at the output resolution). Flat output: a linear map
    from the (globally pooled) input, compact through a bottleneck with about 9x fewer weights.
    Weight shapes depend on channel counts only, so light layers that stand in for the same block
    in successive output modules can be copied into one another.
    """
    if len(out_shape) == 3:
        if len(in_shape) != 3:
            raise ValueError("a flat or token feature cannot feed a convolutional block")
        return _conv_layer(in_shape, out_shape, compact)
    if len(out_shape) == 2:
        if len(in_shape) != 2:
            raise ValueError("only tokens can feed a block of tokens")
        return _token_layer(in_shape[-1], out_shape[-1], compact)
    width, out_features = channels(in_shape), out_shape[0]
    maps: list[nn.Module] = []
    if len(in_shape) == 3:
        maps = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    elif len(in_shape) == 2:
        maps = [TokenMean()]
    if compact:
        rank = max(1, width * out_features // (9 * (width + out_features)))
        maps.append(nn.Linear(width, rank, bias=False))
        width = rank
    return nn.Sequential(*maps, nn.Linear(width, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU())


def _conv_layer(in_shape: Sequence[int], out_shape: Sequence[int], compact: bool) -> nn.Sequential:
    (c_in, h_in, w_in), (c_out, h_out, w_out) = in_shape, out_shape
    if compact:
        pool = nn.AdaptiveAvgPool2d((h_out, w_out)) if (h_in, w_in) != (h_out, w_out) else nn.Identity()
        convs = [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False)]
        return nn.Sequential(pool, *convs, nn.BatchNorm2d(c_out), nn.ReLU())  # same names with or without pooling
    stride = max(1, round(h_in / h_out))
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if (h_in - 1) // stride + 1 != h_out or (w_in - 1) // stride + 1 != w_out:
        layers.append(nn.AdaptiveAvgPool2d((h_out, w_out)))
    return nn.Sequential(*layers)


class TokenMean(nn.Module):
    """(B, N, D) tokens to their (B, D) mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _token_layer(d_in: int, d_out: int, compact: bool) -> nn.Sequential:
    """A Transformer's stand-in: a per-token norm and linear map (through a bottleneck with about
    9x fewer weights, compact), then GELU."""
    if compact:
        rank = max(1, d_in * d_out // (9 * (d_in + d_out)))
        maps: list[nn.Module] = [nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out)]
    else:
        maps = [nn.Linear(d_in, d_out)]
    return nn.Sequential(nn.LayerNorm(d_in), *maps, nn.GELU())


def is_compact(model: BlockModel, k: int) -> bool:
    """Whether the light layer standing in for block k+1 (0-based `k`) takes its compact form:
    the reference's 3x3 conv would have more than `LIGHT_SHARE` of that block's parameters."""
    kernel_area = 9 if len(model.block_shapes[k]) == 3 else 1
    weights = kernel_area * channels(model.block_shapes[k - 1]) * channels(model.block_shapes[k])
    return weights > LIGHT_SHARE * _count(model.blocks[k])


class OutputModule(nn.Module):
    """Op_t: light layers imitating the missing blocks, then a classifier shaped like the real head.

    A compact layer jumps straight to the last block's resolution, and the layers after it stay
    there: the stand-ins only have to give block t the depth and widths that follow it cheaply.
    `forward` returns (feature map Z for the Mentor, logits).
    """

    def __init__(self, model: BlockModel, stage: int) -> None:
        super().__init__()
        shapes = model.block_shapes
        smallest = next(s[1:] for s in reversed(shapes) if len(s) == 3) if len(shapes[0]) == 3 else ()
        layers, shape, pooled = [], shapes[stage - 1], False
        for k in range(stage, model.num_blocks):
            compact = is_compact(model, k)
            pooled = pooled or compact
            target = (shapes[k][0], *smallest) if pooled and len(shapes[k]) == 3 else shapes[k]
            layers.append(light_layer(shape, target, compact))
            shape = target
        self.layers = nn.Sequential(*layers)
        self.head = fresh_head(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.layers(x)
        return z, self.head(z)


PROJECTION_WIDTH = 256
"""P_t's widest layers, used whenever the model can afford them."""

PROJECTION_SHARE = 0.1
"""P_t reads the last block's features; it may have at most this share of that block's parameters,
so that on a network of light blocks it is light too."""


def projection_width(model: BlockModel) -> int:
    """P_t's width: `PROJECTION_WIDTH` (at most the feature size), halved while P_t would have more
    than `PROJECTION_SHARE` of the last block's parameters, and never below the number of classes
    it has to separate."""
    features = channels(model.block_shapes[-1])
    floor = min(features, model.num_classes)
    budget = PROJECTION_SHARE * _count(model.blocks[-1])
    width = min(features, PROJECTION_WIDTH)
    while width // 2 >= floor and features * width + 2 * width * width > budget:
        width //= 2
    return width


class ProjectionHead(nn.Module):
    """P_t: the Mentor's 3-layer MLP from the pooled feature to a small label embedding."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(global_pool(z))
