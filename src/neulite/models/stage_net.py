"""The global network plus its training scaffolding, and the forward pass of one stage model.

Module names are the wire names: `model.blocks.{i}`, `model.head`, `outputs.{i}` (Op_{i+1},
stages 1..T-1; stage T uses the real head) and `projections.{i}` (P_{i+1}). A `StagePlan` lists
which of them a stage freezes and which it trains.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from neulite.errors import NeuliteError
from neulite.models.balance import sequential_units
from neulite.models.blocks import BlockModel, channels, tail_modules
from neulite.models.output_modules import OutputModule, ProjectionHead, projection_width
from neulite.models.recompute import checkpointed, inner_recompute

FULL_MODEL = 0  # the `stage` of a plan that trains the whole model (plain FedAvg)
FROZEN_MICRO_BATCH = 16
"""Samples a recomputing stage runs its frozen prefix on at a time (`StagePlan.frozen_micro_batch`)."""


@dataclass(frozen=True)
class StagePlan:
    """What stage t of T trains (`FULL_MODEL`: the whole model).

    window: how many blocks from block t on train together (elastic NeuLite's forward window: a
    client that fits more pre-trains the next blocks before their stage begins), with the output
    module of the window's last block (`last`); 1 is the paper's stage. reach: how many blocks before
    block t train whole as well (elastic NeuLite's backward window: a client that fits more adapts
    the prefix to the block it trains; `first` is the first block trained); 0 is the paper's stage.
    harmonize: the tail of the block before the first trained one trains too (the Training
    Harmonizer); mentor: the projection head P_t trains (the Curriculum Mentor's label term);
    bn_drift: the frozen blocks' BatchNorm statistics move and are returned (the reference code's
    behaviour) instead of staying fixed; recompute: what trains keeps only its
    segments' inputs and re-runs their forward in backward (`recomputed`), for less memory at the
    cost of time; the result is the same. segment: the units per recomputed segment (0: about √n
    of a module's n); which is leanest depends on the network, so the estimate chooses it.
    recompute_prefix: the frozen blocks' output is not kept either: the first segment re-runs them
    from the batch (their output at full resolution is as large as what a segment keeps; a client
    that recomputes it keeps no `PrefixCache`). kept_segments: how many of the stage's last segments
    (counted back from its output module's last, across the modules it trains) keep their
    activations instead. Backward begins at the last and frees each segment's activations before
    it reaches the earlier, larger ones, so keeping the last few often costs the peak nothing and
    saves their second forward; the estimate decides how many (`NeuLite.rungs`).
    recompute_inner: which of the stage's recomputed segments (bit i: the (i+1)-th, counted across
    the modules it trains) have units with a `recomputable` part (a ResNet unit's first convolution)
    recompute it once more in backward, so the segment's second forward does not keep its
    activations either: a lower peak where a single unit's activations dominate it, for one more
    forward of that part. Often one segment sets the peak, so the estimate asks only for the
    segments that keep it down (`NeuLite.recomputations`).
    Subclasses (a method's own kinds of plan) register themselves by class name, so that the wire
    format can rebuild any plan without knowing the methods.
    """

    stage: int
    num_stages: int
    harmonize: bool = False
    mentor: bool = False
    bn_drift: bool = False
    recompute: bool = False
    window: int = 1
    reach: int = 0
    segment: int = 0
    recompute_prefix: bool = False
    kept_segments: int = 1
    recompute_inner: int = 0

    types: ClassVar[dict[str, type[StagePlan]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        StagePlan.types[cls.__name__] = cls

    def __post_init__(self) -> None:
        widest = 1 if self.stage == FULL_MODEL else self.num_stages - self.stage + 1
        deepest = max(0, self.stage - 1)
        if not (0 <= self.stage <= self.num_stages and 1 <= self.window <= widest and 0 <= self.reach <= deepest):
            raise NeuliteError(
                f"bad stage plan: stage {self.stage} with a window of {self.window} blocks and a reach of "
                f"{self.reach} blocks back in a model of {self.num_stages} blocks"
            )
        if self.segment < 0 or self.kept_segments < 0 or self.recompute_inner < 0:
            raise NeuliteError(
                f"bad stage plan: {self.segment} units per recomputed segment, {self.kept_segments} segments kept, "
                f"{self.recompute_inner} recomputing their units' inner parts"
            )
        if (self.recompute_prefix or self.recompute_inner or not self.kept_segments) and not self.recompute:
            raise NeuliteError(
                "bad stage plan: the frozen prefix, the units' inner parts or the last segment are recomputed only "
                "by a stage that recomputes"
            )

    @property
    def frozen_micro_batch(self) -> int:
        """Samples the frozen prefix runs on at a time (0: the whole batch): a recomputing stage
        trades time for memory, and without autograd and with fixed statistics each sample's
        output is its own, so the prefix's transient peak (a late stage's largest, at full
        resolution) becomes a micro-batch's. Same values: the built-ins measure bit for bit equal
        from 8 samples up (the `PrefixCache` fills in chunks on the same ground)."""
        return FROZEN_MICRO_BATCH if self.recompute and not self.bn_drift else 0

    @property
    def full(self) -> bool:
        return self.stage == FULL_MODEL

    @property
    def first(self) -> int:
        """The first block the stage trains whole (blocks before it are frozen, but for the Harmonizer's tail)."""
        return self.stage - self.reach

    @property
    def last(self) -> int:
        """The last block the stage trains (its output module, projection head and Mentor weights are this block's)."""
        return self.stage + self.window - 1

    def frozen_modules(self) -> tuple[str, ...]:
        return () if self.full else tuple(f"model.blocks.{i}" for i in range(self.first - 1))

    def harmonized_tail(self, net: StageNet) -> list[str]:
        """The Training Harmonizer's part of the stage: the tail of the block before the first one
        trained whole (empty without the Harmonizer, at block 1, or where that block has no tail)."""
        return net.tail(self.first - 2) if self.harmonize and not self.full and self.first >= 2 else []

    def trainable_modules(self, net: StageNet) -> tuple[str, ...]:
        if self.full:
            return ("model",)
        first, last = self.first, self.last
        names = [f"model.blocks.{i}" for i in range(first - 1, last)] + self.harmonized_tail(net)
        names.append("model.head" if last == self.num_stages else f"outputs.{last - 1}")
        if self.mentor:
            names.append(f"projections.{last - 1}")
        return tuple(names)


StagePlan.types[StagePlan.__name__] = StagePlan


def _prefixed(names: tuple[str, ...], key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


class StageNet(nn.Module):
    """A BlockModel with output modules Op_1..Op_{T-1} and projection heads P_1..P_T."""

    def __init__(self, model: BlockModel) -> None:
        super().__init__()
        self.model = model
        t, kind = model.num_blocks, model.block_kinds[-1]
        self.outputs = nn.ModuleList(OutputModule(model, s) for s in range(1, t))
        features, width = channels(model.block_shapes[-1], kind), projection_width(model)
        self.projections = nn.ModuleList(ProjectionHead(features, width, kind) for _ in range(t))
        self._tails: dict[int, list[str]] = {}

    @property
    def num_stages(self) -> int:
        return self.model.num_blocks

    def tail(self, block: int) -> list[str]:
        """Module names of block `block`'s tail (0-based; `tail_modules`), found once per block: a
        stage's forward asks for it every step."""
        if block not in self._tails:
            self._tails[block] = [
                f"model.blocks.{block}.{n}" for n in tail_modules(self.model.blocks[block], f"block {block + 1}")
            ]
        return self._tails[block]

    def plan(self, stage: int, harmonize: bool = False, mentor: bool = False, bn_drift: bool = False) -> StagePlan:
        return StagePlan(stage, self.num_stages, harmonize, mentor, bn_drift)

    def full_plan(self) -> StagePlan:
        """The plan that trains the whole model."""
        return self.plan(FULL_MODEL)

    def state_names(self, modules: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
        """State-dict keys (parameters and buffers) under the given modules."""
        return [k for k in self.state_dict(keep_vars=True) if _prefixed(modules, k) and not _prefixed(exclude, k)]

    def down_names(self, plan: StagePlan) -> list[str]:
        """What a client needs for a stage: the frozen prefix and everything it trains."""
        return self.state_names(plan.frozen_modules() + plan.trainable_modules(self))

    def up_names(self, plan: StagePlan) -> list[str]:
        """What a client returns: the trained modules' state (plus frozen BN stats if they drift)."""
        names = self.state_names(plan.trainable_modules(self))
        if plan.bn_drift:
            trained = set(names)
            names += [
                k
                for k in self.state_names(plan.frozen_modules())
                if k not in trained and not isinstance(self.get_parameter_or_buffer(k), nn.Parameter)
            ]
        return names

    def get_parameter_or_buffer(self, name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        return getattr(self.get_submodule(module_name), attr)

    def prepare(self, plan: StagePlan) -> list[nn.Parameter]:
        """Freeze everything but the stage's trainable modules, set train/eval modes (frozen blocks
        in eval mode: fixed BN statistics); return the parameters to optimise."""
        for p in self.parameters():
            p.requires_grad_(False)
        params = [p for name in plan.trainable_modules(self) for p in self.get_submodule(name).parameters()]
        for p in params:
            p.requires_grad_(True)
        self.train(False)
        for name in plan.trainable_modules(self) + (plan.frozen_modules() if plan.bn_drift else ()):
            self.get_submodule(name).train(True)
        return params

    def frozen_depth(self, plan: StagePlan) -> int:
        """How many leading blocks the stage runs without autograd (a `PrefixCache` may hold their output)."""
        if plan.full:
            return 0
        return plan.first - 2 if plan.harmonized_tail(self) else plan.first - 1

    def frozen_output(self, x: torch.Tensor, plan: StagePlan) -> torch.Tensor:
        """The output of the plan's fully frozen blocks (`frozen_depth`) for `x`, without autograd."""
        return frozen_forward(self.model.blocks[: self.frozen_depth(plan)], x, plan.frozen_micro_batch)

    def stage_forward(
        self, x: torch.Tensor, plan: StagePlan, prefix: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map Z for the Mentor, logits) of stage model [θ_1..θ_last, Op_last] (last = t
        unless the plan's window is wider).

        Fully frozen blocks run without autograd, so none of their activations are kept; `prefix`,
        when given, is their output for `x` (from a `PrefixCache`) and they do not run at all. With
        the Harmonizer, the block before the first trained one runs with autograd on but only its
        tail requires grad: autograd then saves just what the tail needs.
        """
        blocks = self.model.blocks
        if plan.full:
            for block in blocks:
                x = block(x)
            return x, self.model.head(x)
        depth = self.frozen_depth(plan)
        rerun: list[nn.Module] = []  # frozen blocks the first recomputed segment re-runs from the batch
        if prefix is not None:
            x = prefix
        elif plan.recompute_prefix:
            rerun = list(blocks[:depth])
        else:
            x = self.frozen_output(x, plan)
        trained = self.autograd_modules(plan)
        if not plan.recompute:
            for module in trained:
                x = module(x)
        else:
            runs = [_runs(module, plan.segment) for module in trained]
            counts = [len(r) for r in runs]
            kept = _kept_per_module(counts, plan.kept_segments)
            for i, (segments, before) in enumerate(zip(runs, itertools.accumulate(counts, initial=0), strict=False)):
                inner = plan.recompute_inner >> before  # this module's segments' bits
                x = recomputed(segments, x, rerun if i == 0 else [], plan.frozen_micro_batch, kept[i], inner)
        return (x, self.model.head(x)) if plan.last == plan.num_stages else x

    def autograd_modules(self, plan: StagePlan) -> list[nn.Module]:
        """The modules a (not full) stage runs with autograd, in order: its blocks after the frozen
        prefix and, unless the last block is the model's, the output module (which returns Z and logits)."""
        last = plan.last
        blocks = list(self.model.blocks[self.frozen_depth(plan) : last])
        return blocks if last == plan.num_stages else [*blocks, self.outputs[last - 1]]

    def segment_count(self, plan: StagePlan) -> int:
        """How many segments a recomputing stage runs: the most it can keep (`StagePlan.kept_segments`)."""
        return sum(len(_runs(m, plan.segment)) for m in self.autograd_modules(plan))


def _segments(module: nn.Module, size: int = 0) -> list[list[nn.Module]]:
    """A module's `sequential_units` in runs of `size` (0: about √n runs of n units)."""
    parts = sequential_units([module])
    if not parts:  # an empty Sequential: nothing runs, nothing to recompute
        return []
    size = size or math.ceil(len(parts) / math.ceil(math.sqrt(len(parts))))
    return [parts[i : i + size] for i in range(0, len(parts), size)]


def _runs(module: nn.Module, size: int) -> list[list[nn.Module]]:
    """The segments a recomputing stage runs `module` in; an empty module runs as one (a stage's
    first segment may re-run the frozen prefix in it)."""
    return _segments(module, size) or [[]]


def _kept_per_module(counts: list[int], kept: int) -> list[int]:
    """How many of each module's last segments (of `counts`) keep their activations, for the `kept` last of all."""
    per_module = []
    for count in reversed(counts):
        per_module.append(min(kept, count))
        kept -= per_module[-1]
    return per_module[::-1]


def frozen_forward(blocks: Sequence[nn.Module], x: torch.Tensor, micro: int = 0) -> torch.Tensor:
    """`blocks` run on `x` without autograd, `micro` samples at a time (0: all at once), into one
    output: the transient peak is a micro-batch's, the output the batch's."""

    def run(h: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h)
        return h

    with torch.no_grad():  # not inference_mode: its tensors could not be saved for a later backward
        if not blocks or not micro or micro >= len(x):
            return run(x)
        first = run(x[:micro])
        out = first.new_empty((len(x), *first.shape[1:]))
        out[:micro] = first
        for begin in range(micro, len(x), micro):
            out[begin : begin + micro] = run(x[begin : begin + micro])
        return out


def recomputed(
    segments: list[list[nn.Module]],
    x: torch.Tensor,
    frozen: list[nn.Module] | None = None,
    micro: int = 0,
    kept: int = 0,
    inner: int = 0,
) -> Any:
    """A module run as its `segments` (`_runs`) on `x`, its activations recomputed in backward
    instead of kept: only the input of each segment is saved, and a segment re-runs its forward when its gradient is
    needed (non-reentrant `torch.utils.checkpoint`), so the peak holds one segment's activations
    at a time. Same values and gradients; BatchNorm's running statistics move once. `frozen`:
    blocks that run without autograd before the module, inside its first segment, so that their
    output is not kept but re-run from `x` in backward (`micro` samples at a time: `frozen_forward`).
    kept: how many of the last segments keep their activations (`StagePlan.kept_segments`); inner:
    a bit mask of the segments whose units, if recomputed, recompute their `recomputable` parts too."""
    out: Any = x
    lead = frozen or []
    for n, segment in enumerate(segments, 1):
        recomputing = n <= len(segments) - kept

        def run(
            h: Any,
            layers: list[nn.Module] = segment,
            lead: list[nn.Module] = lead,
            inner: bool = bool(inner >> (n - 1) & 1) and recomputing,
        ) -> Any:
            h = frozen_forward(lead, h, micro)
            with inner_recompute(inner):
                for layer in layers:
                    h = layer(h)
            return h

        out = checkpointed(run, out, [*lead, *segment]) if recomputing else run(out)
        lead = []
    return out
