"""ProFL-style progressive training (Wu et al., KDD 2025): a block is frozen once it has converged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neulite.algorithms.neulite import NeuLite, stage_round_budget
from neulite.algorithms.payload import ClientResult
from neulite.config import Config, check
from neulite.models.stage_net import StageNet, StagePlan


@dataclass(frozen=True)
class ProFLOptions:
    """The `[method.profl]` table: window W is the rounds over which a block's effective movement
    is measured; the block counts as converged (next stage) once that movement is below
    `threshold`. inherit_outputs as in `[method.neulite]`."""

    window: int = 3
    threshold: float = 0.5
    inherit_outputs: bool = False

    def __post_init__(self) -> None:
        check(self.window >= 2, "method.profl.window must be >= 2 (one round has no path to compare)")
        check(0 < self.threshold <= 1, "method.profl.threshold must be in (0, 1]")


def effective_movement(start: torch.Tensor, end: torch.Tensor, steps: list[float]) -> float:
    """Net displacement over path length: 1 for a straight drift, about 1/W for W steps jittering around a point."""
    path = sum(steps)
    return float((end - start).norm()) / path if path > 0 else 0.0


class ProFL(NeuLite):
    """NeuLite without the Mentor and the Harmonizer, whose stage advances when its block has converged
    (`neulite-adaptive`: the same advance with the Mentor and the Harmonizer on).

    After every round the active block's parameters θ are compared over the last W rounds:
    EM = ‖θ_r − θ_{r−W}‖ / Σ_i ‖θ_{i+1} − θ_i‖ (`effective_movement`). The next stage starts once
    EM < threshold. So that the run ends within method.rounds, a stage also ends after twice its
    equal share of the rounds, or when only half an equal share per later stage is left; the last
    stage trains until the end. The stage therefore depends on the history: `plan` answers for the
    next round to train, and `state_dict` carries that history into checkpoints.

    Parameters
    ----------
    net : StageNet
        The global model with its output modules.
    cfg : Config
        `[method.profl]` (`ProFLOptions`); method.rounds bounds the schedule.
    mentor, harmonizer : bool
        Switch NeuLite's Curriculum Mentor and Training Harmonizer on (off in ProFL).
    """

    sections = ("neulite", "profl")

    def __init__(self, net: StageNet, cfg: Config, *, mentor: bool = False, harmonizer: bool = False) -> None:
        p: ProFLOptions = cfg.method.section("profl")
        super().__init__(
            net,
            cfg,
            schedule="sequential",
            stage_rounds=(),
            stage_split="equal",
            mentor=mentor,
            harmonizer=harmonizer,
            frozen_bn_drift=False,
            inherit_outputs=p.inherit_outputs,
        )
        share = stage_round_budget(cfg.method.rounds, [1.0] * net.num_stages)
        self.window, self.threshold = p.window, p.threshold
        self.cap = [2 * s for s in share]
        self.reserve = [sum(max(1, s // 2) for s in share[k + 1 :]) for k in range(len(share))]
        self.stage, self.in_stage, self.done = 1, 0, 0
        self._starts: list[torch.Tensor] = []  # θ before each of the last W rounds
        self._steps: list[float] = []  # ‖θ_{i+1} − θ_i‖ of the last W rounds
        self.advances: list[dict[str, Any]] = []  # every stage change: after which round, to which stage, why

    def plan(self, rnd: int) -> StagePlan:
        return self._plan(self.stage)

    def _block(self, stage: int) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.net.model.blocks[stage - 1].parameters()])

    def aggregate_train(self, rnd: int, plan: StagePlan, results: Sequence[ClientResult]) -> None:
        before = self._block(plan.stage)
        super().aggregate_train(rnd, plan, results)
        after = self._block(plan.stage)
        self._starts = [*self._starts, before][-self.window :]
        self._steps = [*self._steps, float((after - before).norm())][-self.window :]
        self.in_stage += 1
        self.done += 1
        movement = effective_movement(self._starts[0], after, self._steps) if len(self._steps) == self.window else None
        if movement is not None and movement < self.threshold:
            self._advance(rnd, f"converged: effective movement {movement:.3f} < {self.threshold}")
        elif self.in_stage >= self.cap[self.stage - 1]:
            self._advance(rnd, f"cap: {self.in_stage} rounds, twice the stage's equal share")
        elif self._out_of_rounds():
            self._advance(rnd, "reserve: the rounds left are what the later stages need")

    def _out_of_rounds(self) -> bool:
        return self.cfg.method.rounds - self.done <= self.reserve[self.stage - 1]

    def _advance(self, rnd: int, why: str) -> None:
        if self.stage < self.net.num_stages:
            self.stage, self.in_stage = self.stage + 1, 0
            self._starts, self._steps = [], []
            self.advances.append({"after_round": rnd, "to_stage": self.stage, "why": why})

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "stage_advances": self.advances}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "stage": self.stage,
            "in_stage": self.in_stage,
            "done": self.done,
            "starts": self._starts,
            "steps": self._steps,
            "advances": self.advances,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage, self.in_stage, self.done = state["stage"], state["in_stage"], state["done"]
        self._starts, self._steps = list(state["starts"]), list(state["steps"])
        self.advances = list(state.get("advances", []))
