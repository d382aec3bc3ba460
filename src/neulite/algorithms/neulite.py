"""NeuLite: progressive block-wise training with the Curriculum Mentor and the Training Harmonizer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from neulite.algorithms.base import Method
from neulite.config import Config
from neulite.errors import NeuliteError
from neulite.models.stage_net import StageNet, StagePlan

DEFAULT_LAMBDA1 = (0.5, 0.3, 0.1, 0.0)
DEFAULT_LAMBDA2 = (0.1, 0.3, 0.5, 0.5)


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
    schedule : {"sequential", "cyclic"}
        sequential: a fixed round budget per stage (method.stage_rounds, or method.rounds split by
        method.stage_split). cyclic: stage = 1, 2, .., T, 1, 2, .. every round (the reference code).
    mentor : bool
        Add the nHSIC terms with per-block weights lambda1 (input) and lambda2 (label).
    harmonizer : bool
        Keep the tail of block t-1 trainable at stage t (Op_t always imitates the missing blocks).
    """

    def __init__(self, net: StageNet, cfg: Config, *, schedule: str, mentor: bool, harmonizer: bool) -> None:
        super().__init__(net, cfg)
        m = cfg.method
        t = net.num_stages
        self.schedule = schedule
        self.mentor = mentor
        self.harmonizer = harmonizer
        self.lambda1 = tuple(m.lambda_scale * v for v in (m.lambda1 or curriculum(DEFAULT_LAMBDA1, t)))
        self.lambda2 = tuple(m.lambda_scale * v for v in (m.lambda2 or curriculum(DEFAULT_LAMBDA2, t)))
        if len(self.lambda1) != t or len(self.lambda2) != t:
            raise NeuliteError(f"bad config: method.lambda1 and method.lambda2 need {t} values (one per block), got {len(self.lambda1)} and {len(self.lambda2)}")
        if m.stage_rounds:
            if len(m.stage_rounds) != t:
                raise NeuliteError(f"bad config: method.stage_rounds needs {t} values (one per block), got {len(m.stage_rounds)}")
            self.stage_rounds = list(m.stage_rounds)
        else:
            sizes = [sum(p.numel() for p in b.parameters()) for b in net.model.blocks]
            self.stage_rounds = stage_round_budget(m.rounds, [1.0] * t if m.stage_split == "equal" else sizes)
        self._ends = np.cumsum(self.stage_rounds)
        self._started = 1  # the latest stage begun (checkpointed: a resumed run must not warm-start twice)

    @property
    def bn_drift(self) -> bool:
        return self.cfg.method.frozen_bn_drift

    def _plan(self, stage: int) -> StagePlan:
        return self.net.plan(stage, harmonize=self.harmonizer, mentor=self.mentor)

    def plan(self, rnd: int) -> StagePlan:
        t = self.net.num_stages
        if self.schedule == "cyclic":
            return self._plan((rnd - 1) % t + 1)
        return self._plan(int(min(np.searchsorted(self._ends, rnd), t - 1)) + 1)

    def plans(self) -> list[StagePlan]:
        return [self._plan(s) for s in range(1, self.net.num_stages + 1)]

    def lambdas(self, plan: StagePlan) -> tuple[float, float]:
        if not self.mentor:
            return 0.0, 0.0
        return self.lambda1[plan.stage - 1], self.lambda2[plan.stage - 1]

    def begin_round(self, plan: StagePlan) -> None:
        if self.schedule != "sequential" or plan.stage <= self._started:
            return
        if self.cfg.method.inherit_outputs:
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

    def state_dict(self) -> dict[str, Any]:
        return {"started": self._started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._started = state.get("started", 1)
