"""The transport-free messages between server and client, and the arithmetic on them.

A driver (the in-process simulator or Flower) only moves `ClientTask`s down and `ClientResult`s
up; what is inside is decided by the algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def check_result(
    result: ClientResult, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], max_examples: int | None = None
) -> None:
    """Reject a reply that is not exactly what the task asked for: the `spec` tensors (names,
    shapes, dtypes), all finite, from a positive number of examples no larger than `max_examples`
    (the client's partition, when the server knows it). Names the first problem."""
    if not isinstance(result, ClientResult):
        raise NeuliteError(f"malformed reply: a {type(result).__name__}, not a ClientResult")
    if not isinstance(result.arrays, Mapping):
        raise NeuliteError(f"malformed reply: arrays is a {type(result.arrays).__name__}, not a mapping of tensors")
    names = set(result.arrays)
    if missing := sorted(set(spec) - names):
        raise NeuliteError(f"malformed reply: missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if extra := sorted(names - set(spec)):
        raise NeuliteError(f"malformed reply: unexpected tensor {extra[0]!r}")
    for name, (shape, dtype) in spec.items():
        value = result.arrays[name]
        if not isinstance(value, torch.Tensor):
            raise NeuliteError(f"malformed reply: {name!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise NeuliteError(
                f"malformed reply: {name!r} is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NeuliteError(f"malformed reply: {name!r} holds NaN or Inf")
    if not isinstance(result.num_examples, int) or not result.num_examples > 0:
        raise NeuliteError(f"malformed reply: num_examples is {result.num_examples!r}")
    if max_examples is not None and result.num_examples > max_examples:
        raise NeuliteError(
            f"reply claims {result.num_examples} examples, more than the client's partition holds ({max_examples})"
        )
