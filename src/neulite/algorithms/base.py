"""The server side of a federated algorithm, as the hooks a driver calls each round.

Modelled on Flower's strategies: a method decides which stage a round trains (`plan`), what a
client receives (`configure_train`), the one training step its clients run (`loss`), and how
replies are merged (`aggregate_train`). It owns its network. It never samples clients, moves
bytes or touches data: that is the driver's job.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neulite.algorithms.evaluate import evaluate
from neulite.algorithms.local import cross_entropy_loss, local_update
from neulite.algorithms.merge import merge_results
from neulite.algorithms.payload import ClientResult, ClientTask, ConfigValue
from neulite.config import Config, TrainConfig, replace_checked
from neulite.data.datasets import TensorDataset
from neulite.errors import NeuliteError
from neulite.memory import MemoryBreakdown, StepLoss, estimate
from neulite.models.arrays import assign_arrays
from neulite.models.blocks import BlockModel
from neulite.models.stage_net import StageNet, StagePlan
from neulite.prefix_cache import PrefixCache

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


class Method(ABC):
    """Base of every method. Subclasses fill in `plan` and `plans`, and may override the rest.

    Parameters
    ----------
    net : StageNet
        The global model with its scaffolding; from here on the method owns it (and may rebuild it).
    cfg : Config
        The whole experiment config (the method reads `method`, its own `[method.SECTION]` and `train`).
    """

    sections: tuple[str, ...] = ()
    """The `[method.SECTION]` tables it reads: a change to another leaves its results valid."""
    respects_memory: bool = True
    batch_dependent_evaluation: bool = False
    """True when a sample's prediction depends on the other samples of its batch (HeteroFL's static
    BatchNorm normalises with the batch's statistics): each client must then validate on its own data."""

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

    def windows(self, plan: StagePlan) -> list[StagePlan]:
        """Wider plans that a client who fits more may train at `plan`'s stage (elastic NeuLite), narrowest first."""
        return []

    def variants(self, plan: StagePlan) -> list[StagePlan]:
        """Every plan a client may train at `plan`'s stage: the plan and its wider windows (NeuLite
        adds its recomputing ones)."""
        return [plan, *self.windows(plan)]

    def trained_plans(self) -> list[StagePlan]:
        """Every plan a client may be sent: each stage, then its wider windows."""
        return [trained for plan in self.plans() for trained in (plan, *self.windows(plan))]

    def setup(self, budgets: Mapping[int, int]) -> None:
        """Adapt to the federation before the first round, from the budgets the clients reported
        (AllSmall sizes its model to the smallest)."""

    def begin_round(self, plan: StagePlan) -> None:
        """Server-side preparation before a round of `plan` is configured (e.g. warm-starting a new stage)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep besides the network's tensors (e.g. a history-dependent schedule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def summary(self) -> dict[str, Any]:
        """Method-specific facts for the run's summary.json (e.g. NeuLite's λ curricula)."""
        return {}

    def task_config(self, plan: StagePlan) -> dict[str, ConfigValue]:
        """The method's own knobs that a client of `plan` needs (sent as the task's config record)."""
        return {}

    def loss(self, config: Mapping[str, ConfigValue]) -> StepLoss:
        """The objective of one client step for a task's config: what `client_update` trains and
        what the memory estimate runs. The default is the stage model's cross-entropy."""
        return cross_entropy_loss

    def memory(self, plan: StagePlan) -> MemoryBreakdown:
        """Estimated training peak of `plan`'s client step at the configured batch size (cached)."""
        if plan not in self._memory:
            step = self.loss(self.task_config(plan))
            self._memory[plan] = estimate(self.net, plan, self.cfg.train.batch_size, step)
        return self._memory[plan]

    def assign(self, plan: StagePlan, budget: int) -> int | None:
        """The capacity level a client with `budget` bytes trains in this stage; None: it cannot take part."""
        if not self.respects_memory or budget >= self.memory(plan).total:
            return 0
        return None

    def configure_train(self, rnd: int, plan: StagePlan, level: int, seed: int) -> ClientTask:
        state = self.net.state_dict()
        arrays = {name: state[name] for name in self.net.down_names(plan)}
        return ClientTask(rnd, plan, arrays, seed, {**self.task_config(plan), "level": level})

    def client_net(self, level: int) -> StageNet:
        """The client-side skeleton for a level: the network's structure on the meta device, no memory."""
        if level not in self._client_nets:
            self._client_nets[level] = copy.deepcopy(self.net).to("meta")
        return self._client_nets[level]

    def reply_spec(self, task: ClientTask) -> Spec:
        """Name -> (shape, dtype) of exactly the tensors a client must return for `task`."""
        net = self.client_net(task.level)
        return {n: (tuple(t.shape), t.dtype) for n in net.up_names(task.plan) for t in [net.get_parameter_or_buffer(n)]}

    def train_config(self, config: Mapping[str, ConfigValue]) -> TrainConfig:
        """The local-training settings of a task: `train`, with the learning rate and local epochs the
        task's config sets (NeuLite's per-stage values), checked as the config itself is."""
        own = {key: config[key] for key in ("lr", "local_epochs") if key in config}
        try:
            return replace_checked(self.cfg.train, own, "task's ") if own else self.cfg.train
        except NeuliteError as exc:
            raise NeuliteError(f"malformed task: {str(exc).removeprefix('bad config: ')}") from None

    def client_update(
        self, task: ClientTask, data: TensorDataset, *, augment: bool, cache: PrefixCache | None = None
    ) -> ClientResult:
        """The client half: train on local data what the task asks, return what was trained (the
        frozen prefix's output from the client's `cache`, when it has one)."""
        net = self.client_net(task.level)
        train = self.train_config(task.config)
        return local_update(net, task, data, train, augment=augment, loss=self.loss(task.config), cache=cache)

    def aggregate_train(self, rnd: int, plan: StagePlan, results: Sequence[ClientResult]) -> None:
        """Merge the replies of round `rnd` into the global model."""
        assign_arrays(self.net, merge_results(results, self.cfg.server))

    def calibration_task(self) -> ClientTask | None:
        """A query the server sends every client before evaluating (HeteroFL's static BatchNorm
        statistics), or None when evaluation needs nothing from the clients."""
        return None

    def calibration_spec(self) -> Spec:
        """Name -> (shape, dtype) of exactly the tensors a calibration reply must hold."""
        raise NotImplementedError(f"{type(self).__name__} asks no calibration")

    def client_calibrate(self, task: ClientTask, data: TensorDataset) -> ClientResult:
        """The client half of `calibration_task`."""
        raise NotImplementedError(f"{type(self).__name__} asks no calibration")

    def calibrate(self, results: Sequence[ClientResult]) -> None:
        """Take the clients' calibration replies (before the next `evaluate`)."""

    def evaluate(self, plan: StagePlan, data: TensorDataset) -> tuple[float, float]:
        """(accuracy, loss) of the model a round's stage trains; `final_plan()` for the deployable one."""
        return evaluate(self.net, plan, data)

    def evaluation_task(self) -> ClientTask:
        """The deployable model as a task for clients to validate on their own data."""
        plan = self.final_plan()
        state = self.net.state_dict()
        return ClientTask(
            0, plan, {name: state[name] for name in self.net.down_names(plan)}, config={"level": self.final_level()}
        )

    def client_evaluate(self, task: ClientTask, data: TensorDataset) -> tuple[float, float]:
        """The client half of validation: (accuracy, loss) of `evaluation_task`'s model on `data`."""
        net = self.client_net(task.level)
        assign_arrays(net, task.arrays)
        return evaluate(net, task.plan, data)

    def final_model(self) -> BlockModel:
        """The deployable network: the blocks and the real head, without scaffolding."""
        return self.net.model

    def final_level(self) -> int:
        """The capacity level whose client skeleton holds the deployable model."""
        return 0

    def final_plan(self) -> StagePlan:
        """The plan whose forward is the deployable model (for evaluation)."""
        return self.net.full_plan()
