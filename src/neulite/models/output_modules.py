"""Training scaffolding that progressive training adds around the blocks.

An output module Op_t stands in for the blocks t+1..T that a stage-t client does not hold: one light
layer per missing block with that block's channel count and resolution change, then a freshly
initialised classifier of the real head's shape (the Harmonizer's forward part). The projection
MLP P_t only feeds the Mentor's label-dependence term. Both are dropped after training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neulite.models.blocks import BlockModel, fresh_head, global_pool


def light_layer(in_shape: Sequence[int], out_shape: Sequence[int]) -> nn.Module:
    """One strided 3x3 conv + norm + ReLU (or linear + norm + ReLU for flat features) from in to out shape."""
    if len(out_shape) == 3:
        if len(in_shape) != 3:
            raise ValueError("a flat feature cannot feed a convolutional block")
        (c_in, h_in, _), (c_out, h_out, w_out) = in_shape, out_shape
        stride = max(1, round(h_in / h_out))
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        ]
        if (h_in - 1) // stride + 1 != h_out or (in_shape[2] - 1) // stride + 1 != w_out:
            layers.append(nn.AdaptiveAvgPool2d((h_out, w_out)))
        return nn.Sequential(*layers)
    in_features = in_shape[0] if len(in_shape) == 1 else int(torch.Size(in_shape).numel())
    flatten: list[nn.Module] = [nn.Flatten()] if len(in_shape) != 1 else []
    return nn.Sequential(
        *flatten, nn.Linear(in_features, out_shape[0], bias=False), nn.BatchNorm1d(out_shape[0]), nn.ReLU()
    )


class OutputModule(nn.Module):
    """Op_t: light layers imitating the missing blocks, then a classifier shaped like the real head.

    `forward` returns (feature map Z for the Mentor, logits).
    """

    def __init__(self, model: BlockModel, stage: int) -> None:
        super().__init__()
        shapes = model.block_shapes
        self.layers = nn.Sequential(*(light_layer(shapes[k - 1], shapes[k]) for k in range(stage, model.num_blocks)))
        self.head = fresh_head(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.layers(x)
        return z, self.head(z)


class ProjectionHead(nn.Module):
    """P_t: the Mentor's 3-layer MLP from the pooled feature to a small embedding.

    Sized by the feature width (hidden min(256, C), output min(128, C)) so that on a small network
    the scaffolding does not outweigh the model it trains.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        hidden, out_features = min(256, in_features), min(128, in_features)
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(global_pool(z))
