"""Memory-balanced partition of a network into blocks.

One block per resolution stage is the natural rule for CNNs, but the first stage then holds most of
the activation memory (a CIFAR ResNet-34's stem + layer1 alone is ~40% of full-model training). This
module cuts a model's finest sequential units into T blocks so that the largest block's training
cost (activations saved for backward plus weights, gradients and momentum) is as small as possible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neulite.errors import NeuliteError
from neulite.models.blocks import LAYERS, BlockModel, cpu_twin
from neulite.saved_tensors import SavedTensorCounter

_JOINED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU)


def units(model: BlockModel) -> list[nn.Module]:
    """The finest sequential pieces: nested nn.Sequential flattened, each conv/linear kept with the norms and activations after it."""
    return sequential_units(model.blocks)


def own_cuts(model: BlockModel) -> list[int]:
    """Where the model's own blocks 1..N-1 end, as indices into `units(model)`."""
    return [len(sequential_units(model.blocks[: i + 1])) for i in range(len(model.blocks) - 1)]


def sequential_units(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """`blocks` run one after another as their finest pieces: nested nn.Sequential opened up (a
    ResNet block's stem and residual units), each conv or linear joined with the norms and
    activations after it (cutting between them would only keep more tensors at the cut)."""

    def flatten(m: nn.Module) -> list[nn.Module]:
        return [u for c in m.children() for u in flatten(c)] if isinstance(m, nn.Sequential) else [m]

    pieces = [u for block in blocks for u in flatten(block)]
    out: list[list[nn.Module]] = []
    for piece in pieces:
        if out and isinstance(piece, _JOINED):
            out[-1].append(piece)
        else:
            out.append([piece])
    return [group[0] if len(group) == 1 else nn.Sequential(*group) for group in out]


def has_layer(unit: nn.Module) -> bool:
    """The unit holds a conv or linear layer (`LAYERS`: what a block's Harmonizer tail is made of)."""
    return any(isinstance(m, LAYERS) for m in unit.modules())


SMALL_BATCH = 2
"""The smaller of the two batches `unit_costs` runs: BatchNorm needs two values per channel."""


def unit_costs(model: BlockModel, batch_size: int) -> list[int]:
    """Per unit of `units(model)`: bytes autograd saves for backward at `batch_size`, plus 3x its
    parameters (weights, gradients, momentum).

    What a layer saves is per-sample activations plus per-channel statistics: affine in the
    batch size, so forwards at two small batches give it at any batch exactly (the same figures
    as a forward at `batch_size` for every built-in network, in a tenth of the time: 3 s for
    ResNet-34 at batch 64). Counted on the CPU whatever the current device, and on an
    uninitialised CPU twin of a model on the meta device (a client's skeleton): there every
    storage has address 0, so every saved tensor would count as one and move the cuts. Only
    shapes matter here, never values."""
    small = min(batch_size, SMALL_BATCH)
    at_small, at_double = _saved_bytes(model, small), _saved_bytes(model, 2 * small)
    return [
        a + (b - a) * (batch_size - small) // small + 3 * sum(p.numel() * p.element_size() for p in piece.parameters())
        for a, b, piece in zip(at_small, at_double, units(model), strict=True)
    ]


def _saved_bytes(model: BlockModel, batch_size: int) -> list[int]:
    """Per unit of `units(model)`: bytes autograd saves for backward at `batch_size`."""
    with torch.device("cpu"):
        model = cpu_twin(model)
        pieces = units(model)
        counter = SavedTensorCounter(model.parameters())
        x = torch.zeros(batch_size, *model.input_shape)
        was_training = model.training
        model.train()
        with counter.hooks():
            for i, piece in enumerate(pieces):
                counter.section = i
                x = piece(x)
        held = counter.held()  # while `x` keeps the graph alive
        model.train(was_training)
    return [held[i] for i in range(len(pieces))]


def balanced_cuts(costs: Sequence[int], num_blocks: int, layers: Sequence[bool] | None = None) -> list[int]:
    """Cut points (exclusive ends of blocks 1..T-1) that minimise the largest block's summed cost.

    `layers` marks the units that hold a conv or linear layer (`has_layer`; default: all): every
    block needs one, for the Harmonizer's tail, so a parameter-free unit (a Flatten, a pooling
    layer) is never a block of its own."""
    n = len(costs)
    layers = [True] * n if layers is None else list(layers)
    held = [0]
    for layer in layers:
        held.append(held[-1] + layer)
    if not 1 <= num_blocks <= held[n]:
        with_layers = "" if held[n] == n else f", {held[n]} of them with a conv or linear layer (each block needs one)"
        raise NeuliteError(
            f"model cannot be split: {num_blocks} blocks requested from {n} sequential units{with_layers}"
        )
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_blocks + 1)]
    cut = [[0] * (n + 1) for _ in range(num_blocks + 1)]
    best[0][0] = 0
    for k in range(1, num_blocks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if held[i] > held[j] and value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    cuts, i = [], n
    for k in range(num_blocks, 1, -1):
        i = cut[k][i]
        cuts.append(i)
    return sorted(cuts)


def split_at(model: BlockModel, cuts: Sequence[int]) -> BlockModel:
    """The same modules (and weights) regrouped into blocks ending at `cuts`."""
    pieces = units(model)
    bounds = [0, *cuts, len(pieces)]
    blocks = [nn.Sequential(*pieces[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return BlockModel(blocks, model.head, model.input_shape, model.num_classes)
