"""HeteroFL (Diao et al., ICLR 2021): width-scaled sub-models of one global model, with static BatchNorm."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from neulite.algorithms.base import Method
from neulite.algorithms.evaluate import evaluate
from neulite.algorithms.payload import ClientResult, ClientTask, assign_arrays
from neulite.algorithms.submodel import WIDTHS, extract, scatter_average, width_net
from neulite.config import Config
from neulite.data.datasets import TensorDataset
from neulite.federation import Client
from neulite.memory import MemoryBreakdown, estimate
from neulite.models.stage_net import StageNet, StagePlan

M = TypeVar("M", bound=nn.Module)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def static_bn(module: M) -> M:
    """sBN: every BatchNorm normalises with its batch's statistics and keeps no running estimates.

    Running statistics of a sub-model describe that sub-model, not the global one, so HeteroFL
    neither tracks nor averages them; there is then nothing to send but the affine parameters.
    """
    for m in module.modules():
        if isinstance(m, _NORMS):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return module


@contextmanager
def data_statistics(model: nn.Module, data: TensorDataset, batch_size: int = 500) -> Iterator[None]:
    """Give `model`'s static BatchNorms the mean and variance of `data` for the duration.

    One no-grad pass in shuffled batches, cumulatively averaged: each sample is then normalised the
    same way whatever batch it is evaluated in, and a class-sorted data set does not skew the
    statistics (per-batch statistics of a sorted test set would be per-class statistics).
    """
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.track_running_stats, bn.momentum = True, None
        bn.running_mean = torch.zeros(bn.num_features)
        bn.running_var = torch.ones(bn.num_features)
        bn.num_batches_tracked = torch.tensor(0)
    was_training = model.training
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    try:
        model.train()
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                model(data.x[order[start : start + batch_size]])
        model.train(was_training)
        yield
    finally:
        static_bn(model)
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)


class HeteroFL(Method):
    """Each client trains the leading channels of every layer, as many as its memory allows.

    Capacity levels are the widths in `WIDTHS` (level 0 = the global model's full width). A client
    trains the widest level whose training peak fits its budget, and sits out if none does. It gets
    the window of channels of every tensor that makes the width-w model, trains it and returns it;
    the server averages every element over the clients that trained it (data-size weighted), and
    elements nobody trained keep their value. BatchNorm is static (`static_bn`): no running
    statistics are kept, sent or averaged; evaluation normalises with statistics of the clients'
    training data (`data_statistics`, the paper's query of the clients after training), and the
    final model normalises with batch statistics.

    Parameters
    ----------
    net : StageNet
        The global model at full width: a built-in zoo model (`cfg.model.name`), since the
        sub-models are that model built narrower.
    cfg : Config
        The experiment config (`model` for the sub-models, `train` for local training and the
        batch size of the memory estimates).
    """

    setup_needs_clients = True

    def __init__(self, net: StageNet, cfg: Config) -> None:
        super().__init__(static_bn(copy.deepcopy(net)), cfg)
        self._level_memory: dict[int, MemoryBreakdown] = {}
        self._offset = 0
        self._clients: Sequence[Client] = ()
        self._calibration: TensorDataset | None = None

    def setup(self, clients: Sequence[Client]) -> None:
        self._clients, self._calibration = clients, None

    def offset(self, rnd: int) -> int:
        """Where every channel window starts in round `rnd`: at the leading channel."""
        return 0

    def plan(self, rnd: int) -> StagePlan:
        return self.net.plan(0)

    def plans(self) -> list[StagePlan]:
        return [self.net.plan(0)]

    def level_memory(self, level: int) -> MemoryBreakdown:
        """Training peak of the width-`WIDTHS[level]` sub-model at the configured batch size."""
        if level not in self._level_memory:
            net = self.net if level == 0 else static_bn(width_net(self.cfg, self.net, WIDTHS[level]))
            self._level_memory[level] = estimate(net, net.plan(0), self.cfg.train.batch_size)
        return self._level_memory[level]

    def memory(self, plan: StagePlan) -> MemoryBreakdown:
        """A round's peak is that of its widest level."""
        return self.level_memory(0)

    def assign(self, plan: StagePlan, budget: int) -> int | None:
        return next((lv for lv in range(len(WIDTHS)) if self.level_memory(lv).total <= budget), None)

    def client_net(self, level: int) -> StageNet:
        if level not in self._client_nets:
            self._client_nets[level] = static_bn(width_net(self.cfg, self.net, WIDTHS[level])).to("meta")
        return self._client_nets[level]

    def configure_train(self, rnd: int, plan: StagePlan, level: int, seed: int) -> ClientTask:
        self._offset = self.offset(rnd)
        sub = self.client_net(level)
        shapes = {name: sub.get_parameter_or_buffer(name).shape for name in sub.down_names(plan)}
        return ClientTask(rnd, plan, extract(self.net.state_dict(), shapes, self._offset), seed=seed, level=level)

    def aggregate_train(self, plan: StagePlan, results: list[ClientResult]) -> None:
        assign_arrays(self.net, scatter_average(self.net.state_dict(), results, self._offset))

    def evaluate(self, plan: StagePlan, data: TensorDataset) -> tuple[float, float]:
        if not self._clients:
            raise RuntimeError("HeteroFL.evaluate needs setup() first: BatchNorm statistics come from the clients' data")
        if self._calibration is None:  # gathered at the first evaluation, not at start-up
            self._calibration = TensorDataset.concat([c.train for c in self._clients])
        with data_statistics(self.net.model, self._calibration):
            return evaluate(self.net, plan, data)
