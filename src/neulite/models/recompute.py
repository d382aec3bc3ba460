"""Activation recomputation's building blocks, shared by a stage's segments and the units inside them.

A recomputed piece keeps only its input and re-runs its forward in backward (non-reentrant
`torch.utils.checkpoint`): the same values and gradients for less memory. A unit (a ResNet unit, say)
may mark an inner part `recomputable`: inside a recomputed segment that asks for it
(`StagePlan.recompute_inner`), that part is recomputed again when backward reaches it, so the
segment's own second forward does not keep the part's activations either.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_inner = threading.local()


@contextlib.contextmanager
def frozen_statistics(modules: list[nn.Module]) -> Iterator[None]:
    """BatchNorm runs as in training but its running statistics stay put (momentum 0, the batch
    count restored): a recomputed forward must not count the batch twice."""
    norms = [m for part in modules for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, kept, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def checkpointed(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, modules: list[nn.Module]
) -> torch.Tensor:
    """`run(x)` keeping only `x`; its forward re-runs in backward with the BatchNorm statistics of
    `modules` (what `run` runs) frozen."""
    return checkpoint(
        run, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), frozen_statistics(modules))
    )


@contextlib.contextmanager
def inner_recompute(on: bool) -> Iterator[None]:
    """While active (in the thread that runs a segment's forward, first or recomputed), the
    `recomputable` parts of units recompute too."""
    outer = getattr(_inner, "on", False)
    _inner.on = on
    try:
        yield
    finally:
        _inner.on = outer


def recomputable(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, modules: list[nn.Module]
) -> torch.Tensor:
    """A unit's inner part `run(x)`: recomputed (`checkpointed`) inside `inner_recompute`, plain otherwise."""
    return checkpointed(run, x, modules) if getattr(_inner, "on", False) else run(x)
