"""DepthFL (Kim et al., ICLR 2023): depth-scaled prefixes with an exit per block and mutual self-distillation."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from neulite.algorithms.base import Method
from neulite.algorithms.payload import ClientResult, ClientTask, ConfigValue, deepest_block
from neulite.config import Config, check
from neulite.data.datasets import TensorDataset
from neulite.memory import MemoryBreakdown, StepLoss
from neulite.models.stage_net import StageNet, StagePlan


@dataclass(frozen=True)
class DepthFLOptions:
    """The `[method.depthfl]` table: kd_weight weighs the mutual self-distillation (0 = exits learn
    from labels only); temperature softens the exits' outputs in its KL terms."""

    kd_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check(self.kd_weight >= 0, "method.depthfl.kd_weight must be >= 0")
        check(self.temperature > 0, "method.depthfl.temperature must be > 0")


@dataclass(frozen=True)
class DepthPlan(StagePlan):
    """Depth `stage` = k: blocks 1..k and an exit after each (Op_i for i < T, the real head after T), all trained."""

    def frozen_modules(self) -> tuple[str, ...]:
        return ()

    def trainable_modules(self, net: StageNet) -> tuple[str, ...]:
        k, t = self.stage, self.num_stages
        exits = [f"outputs.{i}" for i in range(min(k, t - 1))] + (["model.head"] if k == t else [])
        return tuple(f"model.blocks.{i}" for i in range(k)) + tuple(exits)


class DepthNet(StageNet):
    """A StageNet whose output modules double as DepthFL's exits.

    The exit after block i < T is Op_i: one light layer per missing block with that block's shape,
    then a classifier of the head's shape (the role of DepthFL's bottleneck classifiers); after
    block T it is the real head.
    """

    def exits(self, x: torch.Tensor, depth: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last feature map, logits of every exit) of the depth-`depth` prefix."""
        logits = []
        for i, block in enumerate(self.model.blocks[:depth]):
            x = block(x)
            logits.append(self.model.head(x) if i == self.num_stages - 1 else self.outputs[i](x)[1])
        return x, logits

    def frozen_depth(self, plan: StagePlan) -> int:
        return 0 if isinstance(plan, DepthPlan) else super().frozen_depth(plan)

    def stage_forward(
        self, x: torch.Tensor, plan: StagePlan, prefix: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a DepthPlan (it freezes nothing, so there is no prefix): (last feature map, the
        exits' mean logits: the ensemble DepthFL evaluates). Other plans: StageNet's forward."""
        if not isinstance(plan, DepthPlan):
            return super().stage_forward(x, plan, prefix)
        z, logits = self.exits(x, plan.stage)
        return z, torch.stack(logits).mean(0)


def depthfl_loss(logits: list[torch.Tensor], y: torch.Tensor, kd_weight: float, temperature: float) -> torch.Tensor:
    """Σ_i CE(z_i, y) + kd_weight · Σ_i mean_{j≠i} τ²·KL(softmax(z_j/τ) ‖ softmax(z_i/τ)).

    Every exit learns from the labels and from the others' softened outputs; the teachers z_j are
    detached, as in DepthFL's mutual self-distillation.
    """
    loss = sum(F.cross_entropy(z, y) for z in logits)
    if kd_weight and len(logits) > 1:
        scale = kd_weight * temperature**2 / (len(logits) - 1)
        for i, student in enumerate(logits):
            log_p = F.log_softmax(student / temperature, dim=1)
            for j, teacher in enumerate(logits):
                if j != i:
                    log_q = F.log_softmax(teacher.detach() / temperature, dim=1)
                    loss = loss + scale * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return loss


def depthfl_step_loss(
    net: DepthNet,
    plan: StagePlan,
    x: torch.Tensor,
    y: torch.Tensor,
    prefix: None = None,
    *,
    kd_weight: float,
    temperature: float,
) -> torch.Tensor:
    """`depthfl_loss` over the exits of the plan's prefix: the step a DepthFL client trains (its
    plans freeze nothing, so there is never a cached prefix)."""
    return depthfl_loss(net.exits(x, plan.stage)[1], y, kd_weight, temperature)


class DepthFL(Method):
    """Each client trains the deepest prefix of the network that its memory allows.

    Level l trains blocks 1..T-l with an exit after each block (`DepthNet`); a client takes the
    deepest level whose training peak (blocks and exits, estimated like every other method) fits
    its budget, and sits out if not even block 1 fits. Its loss is `depthfl_loss`. The server
    averages each block and exit over the clients that hold it (data-size weighted). Evaluation
    averages the logits of every exit trained so far (the paper's ensemble of the global model's
    classifiers; untrained deeper exits are left out). `final_model` is the blocks with the real
    head, i.e. the deepest exit alone.

    Parameters
    ----------
    net : StageNet
        The global model; its output modules are rebuilt as the exits.
    cfg : Config
        `[method.depthfl]` (`DepthFLOptions`) sets the distillation; `train` the local training.
    """

    sections = ("depthfl",)

    def __init__(self, net: StageNet, cfg: Config) -> None:
        super().__init__(DepthNet(net.model), cfg)
        self.options: DepthFLOptions = cfg.method.section("depthfl")
        self.trained_depth = 1

    def loss(self, config: Mapping[str, ConfigValue]) -> StepLoss:
        return functools.partial(
            depthfl_step_loss, kd_weight=self.options.kd_weight, temperature=self.options.temperature
        )

    def final_plan(self) -> StagePlan:
        return DepthPlan(self.trained_depth, self.net.num_stages)

    def evaluate(self, plan: StagePlan, data: TensorDataset) -> tuple[float, float]:
        return super().evaluate(self.final_plan(), data)

    def state_dict(self) -> dict[str, Any]:
        return {"trained_depth": self.trained_depth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trained_depth = state["trained_depth"]

    def depth_plan(self, level: int) -> DepthPlan:
        t = self.net.num_stages
        return DepthPlan(t - level, t)

    def plan(self, rnd: int) -> StagePlan:
        return self.net.full_plan()

    def plans(self) -> list[StagePlan]:
        return [self.net.full_plan()]

    def memory(self, plan: StagePlan) -> MemoryBreakdown:
        """A round's peak is that of its deepest level (every block and exit)."""
        return super().memory(self.depth_plan(0) if plan.full else plan)

    def assign(self, plan: StagePlan, budget: int) -> int | None:
        levels = range(self.net.num_stages)
        return next((lv for lv in levels if self.memory(self.depth_plan(lv)).total <= budget), None)

    def configure_train(self, rnd: int, plan: StagePlan, level: int, seed: int) -> ClientTask:
        return super().configure_train(rnd, self.depth_plan(level), level, seed)

    def aggregate_train(self, rnd: int, plan: StagePlan, results: Sequence[ClientResult]) -> None:
        """Each tensor is averaged over the clients whose prefix holds it; remembers the deepest block trained (for evaluation)."""
        self.trained_depth = max(self.trained_depth, deepest_block(results))
        super().aggregate_train(rnd, plan, results)
