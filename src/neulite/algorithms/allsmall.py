"""AllSmall: FedAvg on one model shrunk (in width) until the weakest client can train it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from neulite.algorithms.fedavg import FedAvg
from neulite.algorithms.submodel import WIDTHS, width_net
from neulite.config import Config
from neulite.models.stage_net import StageNet, StagePlan


class AllSmall(FedAvg):
    """Every client trains the same small model, so nobody is left out for memory.

    `setup` takes the widest of `WIDTHS` whose full-model training peak fits the smallest budget
    the clients reported, or the narrowest if none does (the clients it still does not fit then
    sit out). `net` becomes that model, so evaluation and the final model are the small one; its
    index in `WIDTHS` is every client's capacity level, which tells a client which model to build.

    Parameters
    ----------
    net : StageNet
        The global model at the configured width, a built-in zoo model (`cfg.model.name`); only
        its inputs and classes are kept.
    cfg : Config
        The experiment config (`model` for the small model, `train` for local training and the
        batch size of the memory estimates).
    """

    def __init__(self, net: StageNet, cfg: Config) -> None:
        super().__init__(net, cfg, exclusive=True)
        self.level = 0

    def setup(self, budgets: Mapping[int, int]) -> None:
        weakest = min(budgets.values())
        for level, width in enumerate(WIDTHS):
            with torch.random.fork_rng():  # the small model's initial weights depend on the seed alone
                torch.manual_seed(self.cfg.seed)
                self.net, self.level = width_net(self.cfg, self.net, width), level
            self._memory.clear()
            if self.memory(self.net.full_plan()).total <= weakest:
                break

    @property
    def width(self) -> float:
        """The small model's width, as a fraction of the configured one."""
        return WIDTHS[self.level]

    def summary(self) -> dict[str, float]:
        return {"width": self.width}

    def final_level(self) -> int:
        return self.level

    def assign(self, plan: StagePlan, budget: int) -> int | None:
        return self.level if budget >= self.memory(plan).total else None

    def client_net(self, level: int) -> StageNet:
        if level not in self._client_nets:
            self._client_nets[level] = width_net(self.cfg, self.net, WIDTHS[level]).to("meta")
        return self._client_nets[level]
