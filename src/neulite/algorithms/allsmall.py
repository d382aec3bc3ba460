"""AllSmall: FedAvg on one model shrunk (in width) until the weakest client can train it."""

from __future__ import annotations

from collections.abc import Sequence

from neulite.algorithms.fedavg import FedAvg
from neulite.algorithms.submodel import WIDTHS, width_net
from neulite.config import Config
from neulite.federation import Client
from neulite.models.stage_net import StageNet


class AllSmall(FedAvg):
    """Every client trains the same small model, so nobody is left out for memory.

    `setup` takes the widest of `WIDTHS` whose full-model training peak fits the smallest budget,
    or the narrowest if none does (the clients it still does not fit then sit out). `net` becomes
    that model, so evaluation and the final model are the small one.

    Parameters
    ----------
    net : StageNet
        The global model at the configured width, a built-in zoo model (`cfg.model.name`); only
        its inputs and classes are kept.
    cfg : Config
        The experiment config (`model` for the small model, `train` for local training and the
        batch size of the memory estimates).
    """

    setup_needs_clients = True

    def __init__(self, net: StageNet, cfg: Config) -> None:
        super().__init__(net, cfg, exclusive=True)
        self.width = 1.0

    def setup(self, clients: Sequence[Client]) -> None:
        weakest = min(c.budget for c in clients)
        for width in WIDTHS:
            self.net, self.width = width_net(self.cfg, self.net, width), width
            self._memory.clear()
            if self.memory(self.net.plan(0)).total <= weakest:
                break
        self._client_nets.clear()
