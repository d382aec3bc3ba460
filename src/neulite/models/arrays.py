"""Named tensors as they travel between server and client, and the two ways a network meets them."""

from __future__ import annotations

import torch
from torch import nn

from neulite.errors import NeuliteError

Arrays = dict[str, torch.Tensor]


def nbytes(arrays: Arrays) -> int:
    return sum(t.numel() * t.element_size() for t in arrays.values())


def assign_arrays(net: nn.Module, arrays: Arrays) -> None:
    """Load received tensors into `net` (copies, so the sender's tensors are never trained in place).

    Tensors replace meta-device placeholders, so a client built on the meta device holds exactly
    its stage's share of the model. Unknown names or wrong shapes are a malformed message.
    """
    reference = net.state_dict(keep_vars=True)
    for name, value in arrays.items():
        if name not in reference:
            raise NeuliteError(f"malformed message: unknown tensor {name!r}")
        if tuple(reference[name].shape) != tuple(value.shape):
            shape, expected = tuple(value.shape), tuple(reference[name].shape)
            raise NeuliteError(f"malformed message: {name!r} has shape {shape}, expected {expected}")
    net.load_state_dict({k: v.detach().clone() for k, v in arrays.items()}, strict=False, assign=True)


def extract_arrays(net: nn.Module, names: list[str]) -> Arrays:
    state = net.state_dict()
    return {n: state[n].detach().clone() for n in names}
