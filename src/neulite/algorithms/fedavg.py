"""Full-model FedAvg on the same engine: the memory-ignoring oracle and ExclusiveFL."""

from __future__ import annotations

from neulite.algorithms.base import Method
from neulite.config import Config
from neulite.models.stage_net import StageNet, StagePlan


class FedAvg(Method):
    """Every round trains the whole model.

    Parameters
    ----------
    exclusive : bool, default False
        False: every client takes part whatever its memory (the oracle). True: only clients whose
        budget fits full-model training (ExclusiveFL).
    """

    def __init__(self, net: StageNet, cfg: Config, exclusive: bool = False) -> None:
        super().__init__(net, cfg)
        self.respects_memory = exclusive

    def plan(self, rnd: int) -> StagePlan:
        return self.net.full_plan()

    def plans(self) -> list[StagePlan]:
        return [self.net.full_plan()]
