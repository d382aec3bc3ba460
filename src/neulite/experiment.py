"""One experiment's set-up, shared by every driver: seed, data, network, method, budgets, server.

Both the in-process simulator and the Flower ServerApp build their experiment here; they differ
only in where the clients' budgets come from (drawn by the budget model, or reported by nodes)
and how the server reaches clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from neulite.algorithms.base import Method
from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.registry import build_method, build_network
from neulite.config import Config
from neulite.data import DataSplits
from neulite.errors import NeuliteError
from neulite.federation import client_indices, load_splits, resolve_blocks
from neulite.memory import estimate
from neulite.planner import BlockPlan
from neulite.server import Query, Server


@dataclass(frozen=True)
class Experiment:
    """The server side of an experiment before any client is known.

    `full_peak` is full-model training's peak at the configured batch size: the yardstick for
    budgets, whatever network the method trains. `cfg` is the config as trained: with
    `model.blocks = "auto"`, the number `block_plan` chose.
    """

    cfg: Config
    splits: DataSplits
    indices: list[tuple[np.ndarray, np.ndarray]]
    method: Method
    full_peak: int
    block_plan: BlockPlan | None = None

    def summary(self) -> dict[str, Any]:
        """What a run records of its set-up beyond its config: the planner's choice, if it made one."""
        return {} if self.block_plan is None else {"block_plan": asdict(self.block_plan)}

    @property
    def partition_sizes(self) -> dict[int, int]:
        """Each client's number of training samples: the most a reply may claim to have trained on."""
        return {cid: len(train) for cid, (train, _) in enumerate(self.indices)}

    def server(self, budgets: Mapping[int, int], query: Query) -> Server:
        """The core server for clients with these budgets; fails before training if a stage fits none."""
        self.method.setup(budgets)
        server = Server(self.method, budgets, self.cfg, self.full_peak, query, self.partition_sizes)
        server.check_feasible()
        return server


def build_experiment(cfg: Config, budgets: Sequence[int] | None = None) -> Experiment:
    """Seed, data, partition, network and method for `cfg`; the data's size is checked before any
    tensor of the configured batch size is built. `model.blocks = "auto"` plans for `budgets`
    (default: the simulated ones)."""
    torch.manual_seed(cfg.seed)
    splits = load_splits(cfg)
    share = len(splits.train) // cfg.data.num_clients
    if cfg.train.batch_size > share:
        raise NeuliteError(
            f"train.batch_size = {cfg.train.batch_size} exceeds the {share} training samples each of the "
            f"{cfg.data.num_clients} clients gets on average from {len(splits.train)}: lower train.batch_size, "
            f"or data.num_clients (at most {len(splits.train) // cfg.train.batch_size} at this batch size)"
        )
    indices = client_indices(cfg, splits)
    cfg, block_plan = resolve_blocks(cfg, splits, budgets)
    net = build_network(cfg, splits.input_shape, splits.train.num_classes)
    full_peak = estimate(net, net.full_plan(), cfg.train.batch_size, cross_entropy_loss).total
    return Experiment(cfg, splits, indices, build_method(cfg, net), full_peak, block_plan)
