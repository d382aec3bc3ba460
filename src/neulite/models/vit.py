"""A small Vision Transformer (`vit_tiny`) cut into blocks of encoder layers.

Patch embedding (a strided conv) and a learned position embedding feed pre-norm encoder layers; the
head normalises the tokens, averages them (no class token, so every block's output is the same
(N, D) token sequence) and classifies. Block 1 holds the embedding and the first layers.

`width` scales the number of attention heads (each `HEAD_DIM` wide) and with it the model width and
MLP width. Queries, keys and values are separate linear maps whose outputs lie head after head, so
the leading slice of every tensor that a width-w model takes (HeteroFL, AllSmall) is exactly its
first heads and MLP units.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from neulite.errors import NeuliteError
from neulite.models.blocks import BlockModel

HEADS = 4
"""Attention heads at width 1."""
HEAD_DIM = 32
DEPTH = 6
"""Encoder layers, grouped into `BLOCKS` blocks of equal depth."""
BLOCKS = 3
MLP_RATIO = 2
PATCH = 4


class PatchEmbedding(nn.Module):
    """Non-overlapping PATCH x PATCH patches to `dim`-wide tokens, plus a learned position per patch."""

    def __init__(self, input_shape: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height % PATCH or width % PATCH:
            raise NeuliteError(
                f"vit_tiny cuts {PATCH}x{PATCH} patches: input height and width must be multiples of {PATCH}, "
                f"got {height}x{width}"
            )
        self.proj = nn.Conv2d(channels, dim, PATCH, stride=PATCH)
        self.position = nn.Parameter(torch.zeros(1, (height // PATCH) * (width // PATCH), dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key and value maps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, d // HEAD_DIM, HEAD_DIM).transpose(1, 2) for m in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(), nn.Linear(MLP_RATIO * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenClassifier(nn.Module):
    """Final norm, mean over tokens, linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean(dim=1))


def vit_tiny(input_shape: tuple[int, int, int], num_classes: int, width: float) -> BlockModel:
    dim = max(1, round(HEADS * width)) * HEAD_DIM
    layers = [EncoderLayer(dim) for _ in range(DEPTH)]
    per_block = DEPTH // BLOCKS
    blocks = [
        nn.Sequential(*([PatchEmbedding(input_shape, dim)] if i == 0 else []), *layers[i : i + per_block])
        for i in range(0, DEPTH, per_block)
    ]
    for m in (m for b in blocks for m in b.modules()):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return BlockModel(blocks, TokenClassifier(dim, num_classes), input_shape, num_classes)
