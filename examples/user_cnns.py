"""Two plain CNNs written the way users write them: one conv + BatchNorm + ReLU per block.

They are the networks neulite was not designed around: every block is a single layer, so the
reference's light layers would be as large as the blocks they stand in for and the output modules
take their compact form (`neulite.models.output_modules`). `heavy_cnn` is weight-heavy
(most of its training memory is weights, gradients and momentum), `plain_cnn` VGG-like.
Both follow neulite's model contract: `(input_shape, num_classes, width) -> BlockModel`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from neulite.models.blocks import BlockModel, ClassifierHead


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def cnn(
    channels: Sequence[int], strides: Sequence[int], input_shape: tuple[int, int, int], num_classes: int, width: float
) -> BlockModel:
    """One block per conv layer; `width` scales every hidden channel count."""
    widths = [max(1, round(c * width)) for c in channels]
    blocks = [
        conv_bn_relu(cin, cout, s) for cin, cout, s in zip([input_shape[0], *widths[:-1]], widths, strides, strict=True)
    ]
    return BlockModel(blocks, ClassifierHead(widths[-1], num_classes), input_shape, num_classes)


def plain_cnn(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> BlockModel:
    """VGG-like: 64-128-256-512 channels, halving the resolution from the second block on."""
    return cnn((64, 128, 256, 512), (1, 2, 2, 2), input_shape, num_classes, width)


def heavy_cnn(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> BlockModel:
    """Weight-heavy: 32-96-192-384 channels; on 8x8 inputs its weights outweigh its activations."""
    return cnn((32, 96, 192, 384), (1, 2, 2, 2), input_shape, num_classes, width)
