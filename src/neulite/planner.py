"""How many blocks to cut a model into for a fleet's memory budgets (`neulite plan`).

More blocks make every stage cheaper but give each fewer rounds, so the planner picks the fewest
blocks, the network's own or memory-balanced ones (`models/balance.py`), for which a target share
of the clients fits every stage: a stage's peak is NeuLite's estimate (Mentor and Harmonizer on), with recomputation
(`train.recompute`) when allowed, so that a client that fits only by recomputing counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.neulite import NeuLite
from neulite.algorithms.registry import build_method
from neulite.config import Config, ModelConfig, TrainConfig
from neulite.errors import NeuliteError
from neulite.memory import estimate
from neulite.models.balance import has_layer, own_cuts, units
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model, cut_points

MAX_BLOCKS = 8
"""The most blocks the planner tries: past that a stage's scaffolding outweighs what it saves."""


@dataclass(frozen=True)
class BlockPlan:
    """One candidate: `blocks` blocks ending at unit indices `cuts`, memory-balanced or (`balanced`
    false) the network's own."""

    blocks: int
    cuts: list[int]
    balanced: bool
    stage_peaks: list[int]  # bytes, each stage as planned (no recomputation)
    # bytes, each stage recomputing what it trains; None: not searched (planned without recomputation)
    recompute_peaks: list[int] | None
    fits: list[int]  # clients whose budget fits each stage (recomputing where allowed and needed)
    share: float  # share of clients that fit every stage
    take_part: float  # share of clients that fit some stage

    @property
    def config_blocks(self) -> int:
        """The `model.blocks` that builds this plan's network."""
        return self.blocks if self.balanced else 0


def plan_blocks(
    model: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    budgets: Sequence[int],
    *,
    width: float = 1.0,
    batch_size: int = 32,
    target: float = 0.9,
    recompute: bool = True,
    max_blocks: int = MAX_BLOCKS,
    progress: Callable[[str], None] | None = None,
) -> tuple[BlockPlan, list[BlockPlan], int]:
    """(chosen plan, every candidate tried, full-model training's peak in bytes).

    The candidates are the network's own blocks and 2 up to `max_blocks` memory-balanced blocks,
    fewest first. The chosen plan is the first whose share reaches `target`; if none does, the one
    under which the most clients take part at all, then the largest share, then the fewest blocks.
    `progress` hears which candidate and stage is being estimated: a large network's search for
    ways to recompute takes minutes."""
    if not budgets:
        raise NeuliteError("a plan needs at least one client budget")
    if not 0 < target <= 1:
        raise NeuliteError(f"target share must be in (0, 1], got {target}")
    whole = build_model(model, input_shape, num_classes, width)
    full = StageNet(whole)
    full_peak = estimate(full, full.full_plan(), batch_size, cross_entropy_loss).total

    def candidate(blocks: int, label: str) -> BlockPlan:
        cfg = Config(
            model=ModelConfig(name=model, width=width, blocks=blocks), train=TrainConfig(batch_size=batch_size)
        )
        method = build_method(cfg, StageNet(build_model(model, input_shape, num_classes, width, blocks)))
        assert isinstance(method, NeuLite)  # the config names a neulite method
        peaks, rpeaks = [], []
        for plan in method.plans():
            if progress:
                progress(f"{label}: stage {plan.stage} of {plan.num_stages}")
            peaks.append(method.memory(plan).total)
            if recompute:  # the search for ways to recompute is most of a plan's time: only when it counts
                rpeaks.append(method.memory(method.recomputing(plan)).total)
        usable = [min(a, b) for a, b in zip(peaks, rpeaks, strict=True)] if recompute else peaks
        fits = [sum(b >= u for b in budgets) for u in usable]
        cuts = cut_points(model, input_shape, num_classes, blocks) if blocks else own_cuts(whole)
        return BlockPlan(
            len(peaks),
            cuts,
            bool(blocks),
            peaks,
            rpeaks if recompute else None,
            fits,
            sum(b >= max(usable) for b in budgets) / len(budgets),
            sum(b >= min(usable) for b in budgets) / len(budgets),
        )

    own = len(whole.blocks)
    most = min(sum(map(has_layer, units(whole))), max_blocks)  # every block needs a conv or linear layer
    counts = sorted([(own, 0), *((n, n) for n in range(2, most + 1))])
    candidates: list[BlockPlan] = []
    for i, (n, blocks) in enumerate(counts):
        kind = "memory-balanced" if blocks else "the network's own"
        candidates.append(candidate(blocks, f"candidate {i + 1} of {len(counts)}, {n} {kind} blocks"))
        if candidates[-1].share >= target:
            return candidates[-1], candidates, full_peak
    return max(candidates, key=lambda c: (c.take_part, c.share, -c.blocks)), candidates, full_peak


def auto_blocks(cfg: Config, input_shape: tuple[int, ...], num_classes: int, budgets: Sequence[int]) -> BlockPlan:
    """The plan a run with `model.blocks = "auto"` trains: `plan_blocks` for its network, batch
    size, `model.plan_share` and recomputation setting."""
    chosen, _, _ = plan_blocks(
        cfg.model.name,
        input_shape,
        num_classes,
        budgets,
        width=cfg.model.width,
        batch_size=cfg.train.batch_size,
        target=cfg.model.plan_share,
        recompute=cfg.train.recompute != "off",
        max_blocks=min(MAX_BLOCKS, cfg.method.rounds),  # every stage needs a round
    )
    return chosen
