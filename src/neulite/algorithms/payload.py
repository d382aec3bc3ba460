"""The transport-free messages between server and client, and the arithmetic on them.

A driver (the in-process simulator or Flower) only moves `ClientTask`s down and `ClientResult`s
up; what is inside is decided by the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from neulite.errors import NeuliteError
from neulite.models.stage_net import StagePlan

Arrays = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientTask:
    """Everything a client needs for one round: what the stage trains, its tensors, the Mentor's weights."""

    round: int
    plan: StagePlan
    arrays: Arrays
    lambda1: float = 0.0
    lambda2: float = 0.0
    seed: int = 0
    level: int = 0  # the client's capacity level for methods with sub-models (width or depth); 0 = full


@dataclass(frozen=True)
class ClientResult:
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def nbytes(arrays: Arrays) -> int:
    return sum(t.numel() * t.element_size() for t in arrays.values())


def assign_arrays(net: nn.Module, arrays: Arrays) -> None:
    """Copy received tensors into `net`, materialising meta-device placeholders.

    Only the received tensors become real memory, so a client built on the meta device holds
    exactly its stage's share of the model. Unknown names or wrong shapes are a malformed message.
    """
    reference = net.state_dict(keep_vars=True)
    for name, value in arrays.items():
        if name not in reference:
            raise NeuliteError(f"malformed message: unknown tensor {name!r}")
        current = reference[name]
        if tuple(current.shape) != tuple(value.shape):
            raise NeuliteError(f"malformed message: {name!r} has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
        module_name, _, attr = name.rpartition(".")
        module = net.get_submodule(module_name)
        if current.is_meta:
            data = value.detach().clone()
            if isinstance(current, nn.Parameter):
                module._parameters[attr] = nn.Parameter(data, requires_grad=current.requires_grad)
            else:
                module._buffers[attr] = data
        else:
            with torch.no_grad():
                current.copy_(value)


def extract_arrays(net: nn.Module, names: list[str]) -> Arrays:
    state = net.state_dict()
    return {n: state[n].detach().clone() for n in names}


def weighted_average(results: list[ClientResult]) -> Arrays:
    """Each tensor's data-size-weighted mean over the clients that returned it.

    Floating tensors are averaged; integer counters take the maximum (never averaged). Clients may
    return different tensors (DepthFL's prefixes): each is merged over its holders only.
    """
    if not results:
        raise ValueError("nothing to aggregate")
    out: Arrays = {}
    for name in dict.fromkeys(n for r in results for n in r.arrays):
        holders = [r for r in results if name in r.arrays]
        first = holders[0].arrays[name]
        if first.is_floating_point():
            total = sum(r.num_examples for r in holders)
            acc = torch.zeros_like(first, dtype=torch.float64)
            for r in holders:
                acc += r.arrays[name].double() * (r.num_examples / total)
            out[name] = acc.to(first.dtype)
        else:
            out[name] = torch.stack([r.arrays[name] for r in holders]).amax(0)
    return out


def check_result(result: ClientResult, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Reject a reply that is not exactly what the task asked for: the `spec` tensors (names,
    shapes, dtypes), all finite, from a positive number of examples. Names the first problem."""
    names = set(result.arrays)
    if missing := sorted(set(spec) - names):
        raise NeuliteError(f"malformed reply: missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if extra := sorted(names - set(spec)):
        raise NeuliteError(f"malformed reply: unexpected tensor {extra[0]!r}")
    for name, (shape, dtype) in spec.items():
        value = result.arrays[name]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise NeuliteError(f"malformed reply: {name!r} is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NeuliteError(f"malformed reply: {name!r} holds NaN or Inf")
    if not result.num_examples > 0:
        raise NeuliteError(f"malformed reply: num_examples is {result.num_examples}")
