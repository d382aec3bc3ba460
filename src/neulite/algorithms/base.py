"""The server side of a federated algorithm, as the hooks a driver calls each round.

Modelled on Flower's strategies: a method decides which stage a round trains (`plan`), what a
client receives (`configure_train`) and how replies are merged (`aggregate_train`). It never
samples clients, moves bytes or touches data: that is the driver's job.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from neulite.algorithms.evaluate import evaluate
from neulite.algorithms.local import local_update, stage_loss
from neulite.algorithms.payload import ClientResult, ClientTask, assign_arrays, weighted_average
from neulite.config import Config
from neulite.data.datasets import TensorDataset
from neulite.federation import Client
from neulite.memory import MemoryBreakdown, estimate
from neulite.models.blocks import BlockModel
from neulite.models.stage_net import StageNet, StagePlan


class Method(ABC):
    """Base of every method. Subclasses fill in `plan` and `plans`, and may override the rest.

    Parameters
    ----------
    net : StageNet
        The global model with its scaffolding; the method owns and updates it.
    cfg : Config
        The whole experiment config (the method reads `method` and `train`).
    """

    respects_memory: bool = True
    # True when `setup` needs the clients themselves (their data or every budget) before a client
    # skeleton exists: such methods run in the in-process simulator only, not over a network
    setup_needs_clients: bool = False

    def __init__(self, net: StageNet, cfg: Config) -> None:
        self.net = net
        self.cfg = cfg
        self._memory: dict[StagePlan, MemoryBreakdown] = {}
        self._client_nets: dict[int, StageNet] = {}

    @abstractmethod
    def plan(self, rnd: int) -> StagePlan:
        """The stage trained in round `rnd` (1-based)."""

    @abstractmethod
    def plans(self) -> list[StagePlan]:
        """Every distinct stage this method trains, in order."""

    def setup(self, clients: Sequence[Client]) -> None:
        """Adapt to the federation before the first round (AllSmall sizes its model to the
        smallest budget; HeteroFL takes BatchNorm statistics from the clients' data, as the paper
        has the server query them)."""

    def begin_round(self, plan: StagePlan) -> None:
        """Server-side preparation before a round of `plan` is configured (e.g. warm-starting a new stage)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep besides the network's tensors (e.g. a history-dependent schedule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def lambdas(self, plan: StagePlan) -> tuple[float, float]:
        return 0.0, 0.0

    def memory(self, plan: StagePlan) -> MemoryBreakdown:
        """Estimated training peak of `plan` at the configured batch size (cached)."""
        if plan not in self._memory:
            self._memory[plan] = estimate(self.net, plan, self.cfg.train.batch_size, sigma=self.cfg.method.sigma, bn_drift=self.bn_drift)
        return self._memory[plan]

    @property
    def bn_drift(self) -> bool:
        return False

    def assign(self, plan: StagePlan, budget: int) -> int | None:
        """The capacity level a client with `budget` bytes trains in this stage; None: it cannot take part."""
        if not self.respects_memory or budget >= self.memory(plan).total:
            return 0
        return None

    def configure_train(self, rnd: int, plan: StagePlan, level: int, seed: int) -> ClientTask:
        state = self.net.state_dict()
        arrays = {name: state[name] for name in self.net.down_names(plan)}
        lambda1, lambda2 = self.lambdas(plan)
        return ClientTask(rnd, plan, arrays, lambda1, lambda2, seed, level)

    def client_net(self, level: int) -> StageNet:
        """The client-side skeleton for a level: the network's structure on the meta device, no memory."""
        if level not in self._client_nets:
            self._client_nets[level] = copy.deepcopy(self.net).to("meta")
        return self._client_nets[level]

    def reply_spec(self, task: ClientTask) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of exactly the tensors a client must return for `task`."""
        net = self.client_net(task.level)
        return {n: (tuple(t.shape), t.dtype) for n in net.up_names(task.plan, self.bn_drift) for t in [net.get_parameter_or_buffer(n)]}

    def client_update(self, task: ClientTask, data: TensorDataset, *, augment: bool) -> ClientResult:
        """The client half: train on local data what the task asks, return what was trained."""
        net = self.client_net(task.level)
        sigma = self.cfg.method.sigma

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return stage_loss(net, task.plan, x, y, task.lambda1, task.lambda2, sigma)[0]

        return local_update(net, task, data, self.cfg.train, augment=augment, loss_fn=loss_fn, bn_drift=self.bn_drift)

    def aggregate_train(self, plan: StagePlan, results: list[ClientResult]) -> None:
        assign_arrays(self.net, weighted_average(results))

    def evaluate(self, plan: StagePlan, data: TensorDataset) -> tuple[float, float]:
        """(accuracy, loss) of the model a round's stage trains; `final_plan()` for the deployable one."""
        return evaluate(self.net, plan, data)

    def final_model(self) -> BlockModel:
        """The deployable network: the blocks and the real head, without scaffolding."""
        return self.net.model

    def final_plan(self) -> StagePlan:
        """The plan whose forward is the deployable model (for evaluation)."""
        return self.net.plan(0)
