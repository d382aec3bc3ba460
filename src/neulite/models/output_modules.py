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

from neulite.errors import NeuliteError
from neulite.models.blocks import MAP, TOKENS, BlockModel, channels, fresh_head, global_pool

LIGHT_SHARE = 0.25
"""A light layer is the reference's strided 3x3 conv only while that has at most this share of the
parameters of the block it stands in for (true of blocks of several layers, whose activations it
then also undercuts); otherwise it is a compact layer."""


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def light_layer(
    in_shape: Sequence[int], out_shape: Sequence[int], compact: bool = False, *, kinds: tuple[str, str]
) -> nn.Module:
    """One layer + norm + ReLU from in to out shape, standing in for a block; `kinds` are the two
    features' kinds (`feature_kind`).

    Feature maps: the reference's strided 3x3 conv (3 taps on a sequence; adaptive pooling when no
    stride hits the shape) or, compact, pooling to the output resolution first and a
    depthwise-separable conv there (about 9x fewer weights, activations only at the output
    resolution). Flat output: a linear map from the (globally pooled) input, compact through a
    bottleneck with about 9x fewer weights. Weight shapes depend on channel counts only, so light
    layers that stand in for the same block in successive output modules can be copied into one another.
    """
    in_kind, out_kind = kinds
    if (out_kind == MAP and (in_kind != MAP or len(in_shape) != len(out_shape))) or (
        out_kind == TOKENS and in_kind != TOKENS
    ):
        raise NeuliteError(
            f"model cannot be split: no light layer turns a block's {in_kind} output {tuple(in_shape)} into the "
            f"next block's {out_kind} output {tuple(out_shape)} (maps feed maps of as many dimensions, tokens feed "
            f"tokens, anything feeds a flat vector; a 2-D output is a map only after a Conv1d)"
        )
    if out_kind == MAP:
        return _conv_layer(in_shape, out_shape, compact)
    if out_kind == TOKENS:
        return _token_layer(in_shape[-1], out_shape[-1], compact)
    width, out_features = channels(in_shape, in_kind), out_shape[0]
    maps: list[nn.Module] = []
    if in_kind == MAP:
        maps = [_POOL[len(in_shape) - 1](1), nn.Flatten()]
    elif in_kind == TOKENS:
        maps = [TokenMean()]
    if compact:
        rank = max(1, width * out_features // (9 * (width + out_features)))
        maps.append(nn.Linear(width, rank, bias=False))
        width = rank
    return nn.Sequential(*maps, nn.Linear(width, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU())


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}
"""A map's layers by its number of spatial dimensions (a sequence's 1, an image's 2)."""


def _conv_layer(in_shape: Sequence[int], out_shape: Sequence[int], compact: bool) -> nn.Sequential:
    (c_in, *size_in), (c_out, *size_out) = in_shape, out_shape
    conv, norm, pool = _CONV[len(size_in)], _NORM[len(size_in)], _POOL[len(size_in)]
    if compact:
        resize = pool(tuple(size_out)) if size_in != size_out else nn.Identity()
        convs = [conv(c_in, c_in, 3, padding=1, groups=c_in, bias=False), conv(c_in, c_out, 1, bias=False)]
        return nn.Sequential(resize, *convs, norm(c_out), nn.ReLU())  # same names with or without pooling
    stride = max(1, round(size_in[0] / size_out[0]))
    layers: list[nn.Module] = [conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), norm(c_out), nn.ReLU()]
    if any((a - 1) // stride + 1 != b for a, b in zip(size_in, size_out, strict=True)):
        layers.append(pool(tuple(size_out)))
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
    shapes, kinds = model.block_shapes, model.block_kinds
    kernel_area = 3 ** (len(shapes[k]) - 1) if kinds[k] == MAP else 1
    weights = kernel_area * channels(shapes[k - 1], kinds[k - 1]) * channels(shapes[k], kinds[k])
    return weights > LIGHT_SHARE * _count(model.blocks[k])


class OutputModule(nn.Module):
    """Op_t: light layers imitating the missing blocks, then a classifier shaped like the real head.

    A compact layer jumps straight to the last block's resolution, and the layers after it stay
    there: the stand-ins only have to give block t the depth and widths that follow it cheaply.
    `forward` returns (feature map Z for the Mentor, logits).
    """

    def __init__(self, model: BlockModel, stage: int) -> None:
        super().__init__()
        shapes, kinds = model.block_shapes, model.block_kinds
        layers, shape, pooled = [], shapes[stage - 1], False
        for k in range(stage, model.num_blocks):
            compact = is_compact(model, k)
            pooled = pooled or compact
            target = (shapes[k][0], *_smallest(model, k)) if pooled and kinds[k] == MAP else shapes[k]
            layers.append(light_layer(shape, target, compact, kinds=(kinds[k - 1], kinds[k])))
            shape = target
        self.layers = nn.Sequential(*layers)
        self.head = fresh_head(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.layers(x)
        return z, self.head(z)


def _smallest(model: BlockModel, k: int) -> tuple[int, ...]:
    """The resolution of the network's last map with block k's number of dimensions."""
    rank = len(model.block_shapes[k])
    return next(
        s[1:]
        for s, kind in zip(reversed(model.block_shapes), reversed(model.block_kinds), strict=True)
        if kind == MAP and len(s) == rank
    )


PROJECTION_WIDTH = 256
"""P_t's widest layers, used whenever the model can afford them."""

PROJECTION_SHARE = 0.1
"""P_t reads the last block's features; it may have at most this share of that block's parameters,
so that on a network of light blocks it is light too."""


def projection_width(model: BlockModel) -> int:
    """P_t's width: `PROJECTION_WIDTH` (at most the feature size), halved while P_t would have more
    than `PROJECTION_SHARE` of the last block's parameters, and never below the number of classes
    it has to separate."""
    features = channels(model.block_shapes[-1], model.block_kinds[-1])
    floor = min(features, model.num_classes)
    budget = PROJECTION_SHARE * _count(model.blocks[-1])
    width = min(features, PROJECTION_WIDTH)
    while width // 2 >= floor and features * width + 2 * width * width > budget:
        width //= 2
    return width


class ProjectionHead(nn.Module):
    """P_t: the Mentor's 3-layer MLP from the pooled feature to a small label embedding."""

    def __init__(self, in_features: int, width: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(global_pool(z, self.kind))
