"""NeuLite: progressive block-wise training with the Curriculum Mentor and the Training Harmonizer."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neulite.algorithms.base import Method
from neulite.algorithms.hsic import nhsic
from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.payload import ClientResult, ClientTask, ConfigValue, deepest_block
from neulite.config import Config, check, choice
from neulite.data.datasets import TensorDataset
from neulite.errors import NeuliteError
from neulite.memory import StepLoss, estimate, step_flops
from neulite.models.stage_net import StageNet, StagePlan
from neulite.scaffolding import StageCost, scaffolding_warning, stage_cost

SEGMENTS = (0, 1, 2, 3)
"""The layers per recomputed segment the estimate chooses from (0: about √n): ResNet-18's first stage is
leanest with pairs, MobileNetV2's and ResNet-34's with single layers, VGG's with √n runs (issue 13)."""

WORTH_A_FORWARD = 0.01
"""The share of a stage's peak that re-running its frozen prefix, its units' inner parts or its last
segment must save: each costs a forward, and a smaller saving is within the estimate's own error."""

DEFAULT_LAMBDA1 = (0.5, 0.3, 0.1, 0.0)
DEFAULT_LAMBDA2 = (0.1, 0.3, 0.5, 0.5)


@dataclass(frozen=True)
class NeuLiteOptions:
    """The `[method.neulite]` table, shared by every `neulite*` variant.

    schedule: "sequential" (a fixed round budget per stage) or "cyclic" (stage 1, 2, .., T, 1, ..
    every round: the reference code). stage_rounds: explicit rounds per stage (sequential); empty
    means split method.rounds by `stage_split` ("equal", or "params": proportional to block size).
    mentor / harmonizer: switch the Curriculum Mentor / Training Harmonizer. lambda1/lambda2: the
    Mentor's per-block weights; empty means the curriculum (`DEFAULT_LAMBDA1`/`DEFAULT_LAMBDA2`)
    interpolated to the number of blocks; lambda_scale multiplies both (tuned on the clients'
    validation splits by `python benchmarks/tune.py lambda`). sigma: the nHSIC kernel width.
    frozen_bn_drift: let frozen blocks' BatchNorm statistics move (the reference code's behaviour)
    instead of running them in eval mode. inherit_outputs: when stage t+1 starts, start Op_{t+1}'s
    light layers and classifier (or, at the last stage, the real head) from the matching layers
    of Op_t, which stood in for the same blocks, instead of from scratch. max_window: elastic
    NeuLite: a client whose budget fits it trains more blocks, up to this many in all (0: as many as
    it fits; 1: the paper's stage for everyone); window_direction: "forward" (the next blocks:
    `StagePlan.window`) or "backward" (the frozen blocks before the stage's: `StagePlan.reach`).
    stage_lr / stage_epochs: the local learning rate and epochs of each stage (one value per block;
    empty: train.lr and train.local_epochs throughout); a stage's small block may take a larger
    step or more epochs at little cost (chosen on validation: `python benchmarks/tune.py
    headline-stage`).
    """

    schedule: str = "sequential"
    stage_rounds: tuple[int, ...] = ()
    stage_split: str = "equal"
    mentor: bool = True
    harmonizer: bool = True
    lambda1: tuple[float, ...] = ()
    lambda2: tuple[float, ...] = ()
    lambda_scale: float = 1.0
    sigma: float = 5.0
    frozen_bn_drift: bool = False
    inherit_outputs: bool = False
    max_window: int = 1
    window_direction: str = "forward"
    stage_lr: tuple[float, ...] = ()
    stage_epochs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        choice("method.neulite.schedule", self.schedule, ("sequential", "cyclic"))
        choice("method.neulite.stage_split", self.stage_split, ("equal", "params"))
        choice("method.neulite.window_direction", self.window_direction, ("forward", "backward"))
        check(all(r >= 1 for r in self.stage_rounds), "method.neulite.stage_rounds entries must be >= 1")
        check(all(lr > 0 for lr in self.stage_lr), "method.neulite.stage_lr entries must be > 0")
        check(all(e >= 1 for e in self.stage_epochs), "method.neulite.stage_epochs entries must be >= 1")
        check(self.sigma > 0, "method.neulite.sigma must be > 0")
        check(self.lambda_scale >= 0, "method.neulite.lambda_scale must be >= 0")
        check(self.max_window >= 0, "method.neulite.max_window must be >= 0 (0: as many blocks as a client fits)")
        check(
            not (self.inherit_outputs and self.max_window != 1 and self.window_direction == "forward"),
            "method.neulite.inherit_outputs and a forward method.neulite.max_window != 1 exclude each other: a wider "
            "window already trains the next stage's output module, which inheriting would overwrite",
        )


def neulite_loss(
    net: StageNet,
    plan: StagePlan,
    x: torch.Tensor,
    y: torch.Tensor,
    prefix: torch.Tensor | None = None,
    *,
    lambda1: float,
    lambda2: float,
    sigma: float,
) -> torch.Tensor:
    """Cross-entropy minus the Mentor's weighted dependence terms: nHSIC(Z_t, X) and nHSIC(P_t(Z_t), Y)."""
    z, logits = net.stage_forward(x, plan, prefix)
    loss = F.cross_entropy(logits, y)
    if plan.mentor and lambda1:
        loss = loss - lambda1 * nhsic(z, x, sigma)
    if plan.mentor and lambda2:
        onehot = F.one_hot(y, net.model.num_classes).float()
        loss = loss - lambda2 * nhsic(net.projections[plan.last - 1](z), onehot, sigma)
    return loss


def curriculum(values: tuple[float, ...], num_stages: int) -> tuple[float, ...]:
    """Interpolate a per-block curriculum (given for 4 blocks) to `num_stages` blocks."""
    if num_stages == 1:
        return (values[-1],)
    src = np.linspace(0.0, 1.0, len(values))
    return tuple(float(v) for v in np.interp(np.linspace(0.0, 1.0, num_stages), src, values))


def stage_round_budget(total: int, weights: list[float]) -> list[int]:
    """Split `total` rounds over stages proportionally to `weights`, at least one round each."""
    if total < len(weights):
        raise NeuliteError(f"bad config: method.rounds = {total} is fewer than the {len(weights)} stages")
    share = np.asarray(weights, dtype=float) / sum(weights) * (total - len(weights))
    rounds = 1 + np.floor(share).astype(int)
    for i in np.argsort(-(share - np.floor(share)))[: total - int(rounds.sum())]:
        rounds[i] += 1
    return [int(r) for r in rounds]


class NeuLite(Method):
    """Stage t trains block t (and Op_t, P_t) with blocks 1..t-1 frozen.

    Parameters
    ----------
    net : StageNet
        The global model with its output modules and projection heads.
    cfg : Config
        method.rounds and the `[method.neulite]` options (`NeuLiteOptions`).
    **variant
        `NeuLiteOptions` fields that a registered variant fixes (e.g. `schedule="cyclic"` for
        neulite-cyclic, `mentor=False` for neulite-no-mentor), overriding the config.
    """

    sections = ("neulite",)

    def __init__(self, net: StageNet, cfg: Config, **variant: Any) -> None:
        super().__init__(net, cfg)
        m = dataclasses.replace(cfg.method.section("neulite"), **variant)
        t = net.num_stages
        self.options = m
        self.schedule, self.mentor, self.harmonizer = m.schedule, m.mentor, m.harmonizer
        self.lambda1 = tuple(m.lambda_scale * v for v in (m.lambda1 or curriculum(DEFAULT_LAMBDA1, t)))
        self.lambda2 = tuple(m.lambda_scale * v for v in (m.lambda2 or curriculum(DEFAULT_LAMBDA2, t)))
        if len(self.lambda1) != t or len(self.lambda2) != t:
            raise NeuliteError(
                f"bad config: method.neulite.lambda1 and method.neulite.lambda2 need {t} values (one per block), got {len(self.lambda1)} and {len(self.lambda2)}"
            )
        for key in ("stage_rounds", "stage_lr", "stage_epochs"):
            if getattr(m, key) and len(getattr(m, key)) != t:
                raise NeuliteError(
                    f"bad config: method.neulite.{key} needs {t} values (one per block), got {len(getattr(m, key))}"
                )
        self.stage_lr = m.stage_lr or (cfg.train.lr,) * t
        self.stage_epochs = m.stage_epochs or (cfg.train.local_epochs,) * t
        if m.stage_rounds:
            self.stage_rounds = list(m.stage_rounds)
        else:
            sizes = [sum(p.numel() for p in b.parameters()) for b in net.model.blocks]
            self.stage_rounds = stage_round_budget(cfg.method.rounds, [1.0] * t if m.stage_split == "equal" else sizes)
        self._ends = np.cumsum(self.stage_rounds)
        self._started = 1  # the latest stage begun (checkpointed: a resumed run must not warm-start twice)
        self._deepest = 0  # the deepest block a client has trained (checkpointed: what `evaluate` shows)
        self._rungs: dict[StagePlan, list[StagePlan]] = {}

    def _plan(self, stage: int) -> StagePlan:
        plan = self.net.plan(
            stage, harmonize=self.harmonizer, mentor=self.mentor, bn_drift=self.options.frozen_bn_drift
        )
        return self.recomputing(plan) if self.cfg.train.recompute == "on" else plan

    def flops(self, plan: StagePlan) -> int:
        """Estimated floating-point operations of `plan`'s client step (`step_flops`, cached with
        its `memory`): the forwards its recomputation re-runs, in time."""
        return step_flops(self.net, plan, self.cfg.train.batch_size, self.loss(self.task_config(plan)))

    def recomputing(self, plan: StagePlan) -> StagePlan:
        """The leanest way to recompute `plan` (the last of its `rungs`); `plan` itself where none
        lowers its peak by `WORTH_A_FORWARD` (a stage whose peak is its weights, or one layer's
        activations, would pay for nothing)."""
        rungs = self.rungs(plan)
        return rungs[-1] if rungs else plan

    def windows(self, plan: StagePlan) -> list[StagePlan]:
        """The stage's wider windows a client may train (up to `max_window` blocks, in
        `window_direction`), narrowest first."""
        forward = self.options.window_direction == "forward"
        widest = plan.num_stages - plan.stage + 1 if forward else plan.stage
        if self.options.max_window:
            widest = min(widest, self.options.max_window)
        if forward:
            return [dataclasses.replace(plan, window=w) for w in range(2, widest + 1)]
        return [dataclasses.replace(plan, reach=w - 1) for w in range(2, widest + 1)]

    def rungs(self, plan: StagePlan) -> list[StagePlan]:
        """The ways to recompute `plan` worth a client's time (`recomputations`), cheapest first:
        by the step's estimated operations (`flops`), each leaner than `plan` and than every
        cheaper rung by `WORTH_A_FORWARD`. train.recompute = "auto" gives a client the first it
        fits: it pays for as much recomputation as its budget needs, in the way that costs least
        (ResNet-18's third of 8 blocks fits 35% of full training by re-running its frozen prefix
        for a sixth more operations, or one unit's inner part for two fifths more)."""
        if plan not in self._rungs:
            rungs, last = [], plan
            for candidate in sorted(self.recomputations(plan), key=lambda p: (self.flops(p), self.memory(p).total)):
                if self._leaner(candidate, last):
                    rungs.append(candidate)
                    last = candidate
            self._rungs[plan] = rungs
        return self._rungs[plan]

    def recomputations(self, plan: StagePlan) -> list[StagePlan]:
        """`plan` recomputing what it trains, in the segment size (`SEGMENTS`) of the lowest
        estimated peak with every segment recomputed, keeping any number of its last segments'
        activations, re-running its frozen prefix or not, and its units' inner parts in none of the
        recomputed segments or in those of the fewest that hold the peak of all within
        `WORTH_A_FORWARD` (often one segment sets the peak, and the same whatever is kept after it).
        The prefix and the inner parts are levers only where, every segment recomputed, each
        lowers the peak by `WORTH_A_FORWARD`: the pool stays a few estimates per segment."""
        sizes = [dataclasses.replace(plan, recompute=True, segment=size, kept_segments=0) for size in SEGMENTS]
        leanest = min(sizes, key=lambda p: self.memory(p).total)
        count = self.net.segment_count(leanest)
        pool = []
        rerun = self.net.frozen_depth(plan) and self._leaner(
            dataclasses.replace(leanest, recompute_prefix=True), leanest
        )
        for prefix in [False, True] if rerun else [False]:
            every = dataclasses.replace(leanest, recompute_prefix=prefix, recompute_inner=(1 << count) - 1)
            alone = dataclasses.replace(every, recompute_inner=0)
            inner = every.recompute_inner if self._leaner(every, alone) else 0
            for bit in range(count if inner else 0):
                fewer = dataclasses.replace(every, recompute_inner=inner & ~(1 << bit))
                if not self._leaner(every, fewer):
                    inner = fewer.recompute_inner
            for kept in range(count if prefix else count + 1):  # all kept: the prefix is never re-run
                base = dataclasses.replace(leanest, recompute_prefix=prefix, kept_segments=kept)
                within = dataclasses.replace(base, recompute_inner=inner & ((1 << (count - kept)) - 1))
                pool += [base, within] if within.recompute_inner and self._leaner(within, base) else [base]
        return pool

    def _leaner(self, plan: StagePlan, than: StagePlan) -> bool:
        """`plan`'s estimated peak is below `than`'s by `WORTH_A_FORWARD`: a saving worth a forward."""
        return self.memory(plan).total < (1 - WORTH_A_FORWARD) * self.memory(than).total

    def variants(self, plan: StagePlan) -> list[StagePlan]:
        """A client's capacity level is an index into this list: 0 the stage as planned, then the
        wider windows (`windows`, narrowest first), then the recomputing rungs (`rungs`, cheapest first)."""
        return [*super().variants(plan), *(self.rungs(plan) if self.cfg.train.recompute == "auto" else [])]

    def fitting(self, plan: StagePlan, budget: int) -> StagePlan | None:
        """The stage as planned if `budget` fits it, else the cheapest recomputing rung it fits
        (train.recompute = "auto"); None: neither."""
        candidates = [plan, *(self.rungs(plan) if self.cfg.train.recompute == "auto" else [])]
        return next((p for p in candidates if budget >= self.memory(p).total), None)

    def assign(self, plan: StagePlan, budget: int) -> int | None:
        """The widest window the client fits, else what it fits of the stage (`fitting`), as its
        level in `variants`; None: it cannot take part."""
        variants = self.variants(plan)
        for level in range(len(self.windows(plan)), 0, -1):
            if budget >= self.memory(variants[level]).total:
                return level
        fitting = self.fitting(plan, budget)
        return None if fitting is None else variants.index(fitting)

    def configure_train(self, rnd: int, plan: StagePlan, level: int, seed: int) -> ClientTask:
        """The task for the level's variant: the same network whatever the variant (client level 0),
        the plan telling the client what to train and how."""
        return super().configure_train(rnd, self.variants(plan)[level], 0, seed)

    def plan(self, rnd: int) -> StagePlan:
        t = self.net.num_stages
        if self.schedule == "cyclic":
            return self._plan((rnd - 1) % t + 1)
        return self._plan(int(min(np.searchsorted(self._ends, rnd), t - 1)) + 1)

    def plans(self) -> list[StagePlan]:
        return [self._plan(s) for s in range(1, self.net.num_stages + 1)]

    def task_config(self, plan: StagePlan) -> dict[str, ConfigValue]:
        """The Mentor's weights for the plan's last block (0 without the Mentor), and the stage's
        learning rate and local epochs."""
        own: dict[str, ConfigValue] = {
            "lr": self.stage_lr[plan.stage - 1],
            "local_epochs": self.stage_epochs[plan.stage - 1],
        }
        if not self.mentor:
            return {"lambda1": 0.0, "lambda2": 0.0, **own}
        return {"lambda1": self.lambda1[plan.last - 1], "lambda2": self.lambda2[plan.last - 1], **own}

    def loss(self, config: Mapping[str, ConfigValue]) -> StepLoss:
        return functools.partial(
            neulite_loss, lambda1=float(config["lambda1"]), lambda2=float(config["lambda2"]), sigma=self.options.sigma
        )

    def summary(self) -> dict[str, Any]:
        return {
            "lambda1": list(self.lambda1),
            "lambda2": list(self.lambda2),
            "stage_lr": list(self.stage_lr),
            "stage_epochs": list(self.stage_epochs),
        }

    def setup(self, budgets: Mapping[int, int]) -> None:
        """Warn, with figures, when the model's blocks are too light for progressive training to gain."""
        message = scaffolding_warning(self.stage_costs(), self.cfg.train.batch_size)
        if message:
            warnings.warn(message, stacklevel=2)

    def stage_costs(self) -> list[StageCost]:
        """Each stage's estimated peak and the part its scaffolding adds, next to full-model training."""
        batch = self.cfg.train.batch_size
        full = estimate(self.net, self.net.full_plan(), batch, cross_entropy_loss).total
        return [stage_cost(self.net, plan, self.memory(plan).total, full, batch) for plan in self.plans()]

    def begin_round(self, plan: StagePlan) -> None:
        if self.schedule != "sequential" or plan.stage <= self._started:
            return
        if self.options.inherit_outputs:
            for stage in range(self._started + 1, plan.stage + 1):
                self._inherit(stage)
        self._started = plan.stage

    def _inherit(self, stage: int) -> None:
        """Op_stage (or the real head at the last stage) from Op_{stage-1}: its light layers after the
        first stood in for the same blocks, and its classifier has the head's shape."""
        src = self.net.outputs[stage - 2]
        with torch.no_grad():
            if stage == self.net.num_stages:
                self.net.model.head.load_state_dict(src.head.state_dict())
                return
            dst = self.net.outputs[stage - 1]
            for k, layer in enumerate(dst.layers):
                layer.load_state_dict(src.layers[k + 1].state_dict())
            dst.head.load_state_dict(src.head.state_dict())

    def aggregate_train(self, rnd: int, plan: StagePlan, results: Sequence[ClientResult]) -> None:
        super().aggregate_train(rnd, plan, results)
        if self.schedule == "sequential":
            self._deepest = max(self._deepest, deepest_block(results))

    def evaluate(self, plan: StagePlan, data: TensorDataset) -> tuple[float, float]:
        """The deepest exit a client has trained, as DepthFL's: elastic NeuLite's wider windows train
        later blocks, their output modules and, the widest, the real head before those blocks' own
        stage, and the server holds that deeper model. (Without windows the deepest is the stage's
        own exit; the cyclic schedule shows each round's stage, as the reference code does.)"""
        deepest = max(plan.last, self._deepest)
        return super().evaluate(plan if deepest == plan.last else self.net.plan(deepest), data)

    def state_dict(self) -> dict[str, Any]:
        return {"started": self._started, "deepest": self._deepest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._started = state.get("started", 1)
        self._deepest = state.get("deepest", 0)
