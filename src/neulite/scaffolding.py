"""What a stage's scaffolding costs, and the set-up warning when progressive training cannot gain.

A stage's scaffolding is what it trains besides the blocks: the output module Op_t, the projection
head P_t and the Mentor's terms on their features. Its cost is the stage's estimated peak minus
the peak of the same stage with a linear probe in Op_t's place and no Mentor (the least a stage
needs to be trained), both by the exact estimate. Blocks of one light layer each leave nothing
for the scaffolding to hide in: then a stage can cost as much as the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from neulite.algorithms.local import cross_entropy_loss
from neulite.memory import MIB, estimate
from neulite.models.blocks import BlockModel, ClassifierHead, channels
from neulite.models.stage_net import StageNet, StagePlan

MAX_SCAFFOLDING_SHARE = 0.25
"""Above this share of the memory NeuLite asks of a client (its costliest stage's peak), a stage's
scaffolding rather than its blocks sets who can train it: the set-up warns. Measured against the
costliest stage, not the stage itself, since a cheap stage (a first block of a few channels next to
a P_t sized by the last block) can be mostly scaffolding and still cost nobody their place."""


@dataclass(frozen=True)
class StageCost:
    """A stage's estimated peak, the part of it its scaffolding adds, and full-model training's peak (bytes)."""

    stage: int
    peak: int
    scaffolding: int
    full: int

    @property
    def share(self) -> float:
        """The scaffolding's share of the stage's peak."""
        return self.scaffolding / self.peak

    @property
    def gains(self) -> bool:
        """Whether the stage needs less than full-model training."""
        return self.peak < self.full


def probe_stage(net: StageNet, plan: StagePlan) -> tuple[StageNet, StagePlan]:
    """`plan`'s stage without scaffolding: blocks 1..t under a linear probe (the real head at the
    last stage), with the same Harmonizer and BatchNorm settings and no Mentor."""
    model, t = net.model, plan.stage
    shape, kind = model.block_shapes[t - 1], model.block_kinds[t - 1]
    head = model.head if t == plan.num_stages else ClassifierHead(channels(shape, kind), model.num_classes, kind)
    probe = StageNet(BlockModel(list(model.blocks[:t]), head, model.input_shape, model.num_classes))
    return probe, probe.plan(t, harmonize=plan.harmonize, bn_drift=plan.bn_drift)


def stage_cost(net: StageNet, plan: StagePlan, peak: int, full: int, batch_size: int) -> StageCost:
    """The cost of stage `plan` whose estimated peak is `peak`, next to full-model training's `full`."""
    probe, probe_plan = probe_stage(net, plan)
    bare = estimate(probe, probe_plan, batch_size, cross_entropy_loss).total
    return StageCost(plan.stage, peak, max(0, peak - bare), full)


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB"


def scaffolding_warning(costs: Sequence[StageCost], batch_size: int) -> str | None:
    """A warning naming every stage that needs no less than full-model training or whose scaffolding
    exceeds `MAX_SCAFFOLDING_SHARE` of the costliest stage's peak, with the figures and the remedy;
    None if none does."""
    costliest = max(c.peak for c in costs)
    bad = [c for c in costs if not c.gains or c.scaffolding > MAX_SCAFFOLDING_SHARE * costliest]
    if not bad:
        return None
    stages = "; ".join(
        f"stage {c.stage} needs {_size(c.peak)} ({c.peak / c.full:.0%} of full-model training), "
        f"{_size(c.scaffolding)} of it scaffolding ({c.share:.0%})"
        for c in bad
    )
    return (
        f"progressive training gains little on this model at batch {batch_size} (full-model training: "
        f"{_size(costs[0].full)}, costliest stage: {_size(costliest)}): {stages}. A stage not below "
        f"full-model training, or scaffolding above {MAX_SCAFFOLDING_SHARE:.0%} of the costliest stage, means "
        f"the blocks are too light for what trains around them: use fewer, larger blocks "
        f"(model.blocks = N with N < {len(costs)}, or group your model's layers so)"
    )
