"""The in-process driver: a federation of simulated clients around one `Server`, round by round.

The server decides who trains what; this driver hands each sampled client its `ClientTask`, runs
the method's client update on that client's own data and gives the replies back. Flower's driver
makes the same calls over the network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from neulite.algorithms.payload import ClientResult
from neulite.algorithms.registry import build_method
from neulite.config import Config
from neulite.data import TensorDataset
from neulite.errors import NeuliteError
from neulite.federation import Client, augment_enabled, load_splits, make_clients
from neulite.memory import estimate
from neulite.models.stage_net import StagePlan
from neulite.server import RoundRecord, Server

log = logging.getLogger(__name__)


class Simulation:
    """Clients, data and server for one config; `run_round` advances the experiment by one round."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.splits = load_splits(cfg)
        self.net, self.method = build_method(cfg, self.splits.input_shape, self.splits.train.num_classes)
        # the full model's peak is the yardstick for budgets, whatever network the method trains
        full_peak = estimate(self.net, self.net.plan(0), cfg.train.batch_size).total
        self.clients = make_clients(cfg, self.splits, full_peak)
        self.method.setup(self.clients)
        self.augment = augment_enabled(cfg, self.splits)
        self.server = Server(self.method, {c.cid: c.budget for c in self.clients}, cfg, full_peak)
        self.server.check_feasible()

    def eligible(self, plan: StagePlan) -> list[tuple[Client, int]]:
        """The clients that can take part in a stage, each with the capacity level it would train."""
        return [(self.clients[cid], level) for cid, level in self.server.eligible(plan)]

    def run_round(self, rnd: int, on_client: Callable[[], None] | None = None) -> RoundRecord:
        configured = self.server.configure(rnd)
        results: dict[int, ClientResult] = {}
        for cid, task in configured.tasks.items():
            try:
                results[cid] = self.method.client_update(task, self.clients[cid].train, augment=self.augment)
            except NeuliteError as exc:
                log.warning("client %d left out of round %d: %s", cid, rnd, exc)
            finally:
                if on_client is not None:
                    on_client()
        return self.server.aggregate(configured, results, self.splits.test)

    def final_accuracy(self) -> tuple[float, float]:
        """(accuracy, loss) of the deployable model on the global test set."""
        return self.method.evaluate(self.method.final_plan(), self.splits.test)

    def validation_accuracy(self) -> float:
        """Accuracy of the deployable model on the union of the validation splits of the clients
        that fit some stage (for tuning; Flower asks the same nodes)."""
        vals = [self.clients[cid].val for cid in self.server.able() if len(self.clients[cid].val)]
        if not vals:
            return float("nan")
        return self.method.evaluate(self.method.final_plan(), TensorDataset.concat(vals))[0]
