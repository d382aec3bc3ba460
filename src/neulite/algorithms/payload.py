"""The transport-free messages between server and client, and the arithmetic on them.

A driver (the in-process simulator or Flower) only moves `ClientTask`s down and `ClientResult`s
up; what is inside is decided by the algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from neulite.errors import NeuliteError
from neulite.models.arrays import Arrays
from neulite.models.stage_net import StagePlan

ConfigValue = int | float | bool | str


@dataclass(frozen=True)
class ClientTask:
    """Everything a client needs for one round: what the stage trains, its tensors, and the
    method's own knobs for this client (`config`, like Flower's ConfigRecord: NeuLite's Mentor
    weights, a sub-model's capacity level, ...)."""

    round: int
    plan: StagePlan
    arrays: Arrays
    seed: int = 0
    config: Mapping[str, ConfigValue] = field(default_factory=dict)

    @property
    def level(self) -> int:
        """The client's capacity level for methods with sub-models (width or depth); 0 = the full model."""
        return int(self.config.get("level", 0))


@dataclass(frozen=True)
class ClientResult:
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def deepest_block(results: Sequence[ClientResult]) -> int:
    """The deepest block (1-based) whose tensors a reply holds (0: none): how deep a round trained."""
    return max(
        (int(name.split(".")[2]) + 1 for r in results for name in r.arrays if name.startswith("model.blocks.")),
        default=0,
    )


Layout = Mapping[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, dtype name as numpy spells it: "float32", "int64")."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_layout(found: Layout, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Reject tensors that are not exactly the `spec` ones (names, shapes, dtypes), whether held as
    tensors or still serialised. Names the first problem."""
    if missing := sorted(set(spec) - set(found)):
        raise NeuliteError(f"malformed reply: missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if extra := sorted(set(found) - set(spec)):
        raise NeuliteError(f"malformed reply: unexpected tensor {extra[0]!r}")
    for name, (shape, dtype) in spec.items():
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != shape or got_dtype != dtype_name(dtype):
            raise NeuliteError(
                f"malformed reply: {name!r} is {got_dtype}{list(got_shape)}, expected {dtype_name(dtype)}{list(shape)}"
            )


def check_result(result: ClientResult, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Reject a reply that is not exactly what the task asked for: the `spec` tensors (names,
    shapes, dtypes), all finite, from a positive number of examples. Names the first problem."""
    if not isinstance(result, ClientResult):
        raise NeuliteError(f"malformed reply: a {type(result).__name__}, not a ClientResult")
    if not isinstance(result.arrays, Mapping):
        raise NeuliteError(f"malformed reply: arrays is a {type(result.arrays).__name__}, not a mapping of tensors")
    if bad := [name for name, value in result.arrays.items() if not isinstance(value, torch.Tensor)]:
        raise NeuliteError(f"malformed reply: {bad[0]!r} is a {type(result.arrays[bad[0]]).__name__}, not a tensor")
    check_layout({name: (tuple(t.shape), dtype_name(t.dtype)) for name, t in result.arrays.items()}, spec)
    for name, value in result.arrays.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NeuliteError(f"malformed reply: {name!r} holds NaN or Inf")
    if not isinstance(result.num_examples, int) or not result.num_examples > 0:
        raise NeuliteError(f"malformed reply: num_examples is {result.num_examples!r}")


def check_claim(result: ClientResult, partition_size: int | None) -> None:
    """Reject a reply claiming more examples than the client's partition holds (when the server knows it)."""
    if partition_size is not None and result.num_examples > partition_size:
        raise NeuliteError(
            f"it claims {result.num_examples} examples, more than the client's partition holds ({partition_size})"
        )
