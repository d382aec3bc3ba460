"""HeteroFL (Diao et al., ICLR 2021): width-scaled sub-models of one global model, with static BatchNorm."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from neulite.algorithms.base import Method, Spec
from neulite.algorithms.evaluate import evaluate
from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.merge import merge_results
from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.algorithms.submodel import WIDTHS, extract, scatter_average, width_net
from neulite.config import Config
from neulite.data.datasets import TensorDataset
from neulite.memory import MemoryBreakdown, estimate
from neulite.models.arrays import assign_arrays
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


def bn_statistics(model: nn.Module, data: TensorDataset, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Per static BatchNorm of `model`: the mean and second moment (E[x²]) of its input over `data`.

    One no-grad pass in shuffled batches, every BatchNorm normalising with its batch's statistics
    (as sBN trains) while the batches' means and variances are averaged; the second moment lets the
    server pool several clients' statistics exactly (`pooled_statistics`). A class-sorted data set
    does not skew them: each sample is normalised the same way whatever batch it lands in.
    """
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _NORMS)}
    was_training, momenta = model.training, [bn.momentum for bn in norms.values()]
    for bn in norms.values():
        bn.track_running_stats, bn.momentum = True, None
        bn.running_mean = torch.zeros(bn.num_features)
        bn.running_var = torch.ones(bn.num_features)
        bn.num_batches_tracked = torch.tensor(0)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    try:
        model.train()
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                model(data.x[order[start : start + batch_size]])
        stats = {}
        for name, bn in norms.items():
            stats[f"{name}.mean"] = bn.running_mean.clone()
            stats[f"{name}.second_moment"] = bn.running_var + bn.running_mean**2
        return stats
    finally:
        static_bn(model)
        for bn, momentum in zip(norms.values(), momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)


@contextmanager
def pooled_statistics(model: nn.Module, stats: dict[str, torch.Tensor]) -> Iterator[None]:
    """Normalise `model`'s static BatchNorms with the given pooled mean and second moment for the duration."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _NORMS)}
    for name, bn in norms.items():
        mean = stats[f"{name}.mean"]
        bn.track_running_stats = True
        bn.running_mean, bn.running_var = mean, (stats[f"{name}.second_moment"] - mean**2).clamp_min(0)
        bn.num_batches_tracked = torch.tensor(0)
    try:
        yield
    finally:
        static_bn(model)


class HeteroFL(Method):
    """Each client trains the leading channels of every layer, as many as its memory allows.

    Capacity levels are the widths in `WIDTHS` (level 0 = the global model's full width). A client
    trains the widest level whose training peak fits its budget, and sits out if none does. It gets
    the window of channels of every tensor that makes the width-w model, trains it and returns it;
    the server averages every element over the clients that trained it (data-size weighted), and
    elements nobody trained keep their value. BatchNorm is static (`static_bn`): no running
    statistics are kept, sent or averaged; before the server evaluates, it queries every client
    for the statistics of its training data under the current model (`calibration_task`, the
    paper's query of the clients after training) and normalises with their pooled values; the
    final model, and a client validating it, normalise with batch statistics.

    Parameters
    ----------
    net : StageNet
        The global model at full width: a built-in zoo model (`cfg.model.name`), since the
        sub-models are that model built narrower.
    cfg : Config
        The experiment config (`model` for the sub-models, `train` for local training and the
        batch size of the memory estimates).
    """

    batch_dependent_evaluation = True

    def __init__(self, net: StageNet, cfg: Config) -> None:
        super().__init__(static_bn(net), cfg)
        self._level_memory: dict[int, MemoryBreakdown] = {}
        self._statistics: dict[str, torch.Tensor] | None = None

    def window_start(self, rnd: int) -> int:
        """Where every channel window starts in round `rnd`: at the leading channel."""
        return 0

    def plan(self, rnd: int) -> StagePlan:
        return self.net.full_plan()

    def plans(self) -> list[StagePlan]:
        return [self.net.full_plan()]

    def level_memory(self, level: int) -> MemoryBreakdown:
        """Training peak of the width-`WIDTHS[level]` sub-model at the configured batch size."""
        if level not in self._level_memory:
            net = self.net if level == 0 else static_bn(width_net(self.cfg, self.net, WIDTHS[level]))
            self._level_memory[level] = estimate(net, net.full_plan(), self.cfg.train.batch_size, cross_entropy_loss)
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
        sub = self.client_net(level)
        shapes = {name: sub.get_parameter_or_buffer(name).shape for name in sub.down_names(plan)}
        return ClientTask(
            rnd, plan, extract(self.net.state_dict(), shapes, self.window_start(rnd)), seed, {"level": level}
        )

    def aggregate_train(self, rnd: int, plan: StagePlan, results: Sequence[ClientResult]) -> None:
        assign_arrays(
            self.net, scatter_average(self.net.state_dict(), results, self.window_start(rnd), self.cfg.server)
        )

    def calibration_task(self) -> ClientTask:
        plan = self.final_plan()
        state = self.net.state_dict()
        return ClientTask(0, plan, {name: state[name] for name in self.net.down_names(plan)})

    def calibration_spec(self) -> Spec:
        norms = [(name, m) for name, m in self.client_net(0).model.named_modules() if isinstance(m, _NORMS)]
        return {
            f"{name}.{kind}": ((m.num_features,), torch.float32)
            for name, m in norms
            for kind in ("mean", "second_moment")
        }

    def client_calibrate(self, task: ClientTask, data: TensorDataset) -> ClientResult:
        net = self.client_net(0)
        assign_arrays(net, task.arrays)
        return ClientResult(bn_statistics(net.model, data), len(data))

    def calibrate(self, results: Sequence[ClientResult]) -> None:
        self._statistics = merge_results(list(results), self.cfg.server)

    def evaluate(self, plan: StagePlan, data: TensorDataset) -> tuple[float, float]:
        if self._statistics is None:
            raise RuntimeError(
                "HeteroFL.evaluate needs calibrate() first: BatchNorm statistics come from the clients' data"
            )
        with pooled_statistics(self.net.model, self._statistics):
            return evaluate(self.net, plan, data)
