"""Client-side local training of one stage: the only place where gradients are taken."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from neulite.algorithms.hsic import nhsic
from neulite.algorithms.payload import ClientResult, ClientTask, assign_arrays, extract_arrays
from neulite.config import TrainConfig
from neulite.data.augment import random_crop_flip
from neulite.data.datasets import TensorDataset
from neulite.errors import NeuliteError
from neulite.models.stage_net import StageNet, StagePlan


def stage_loss(
    net: StageNet, plan: StagePlan, x: torch.Tensor, y: torch.Tensor, lambda1: float, lambda2: float, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): cross-entropy minus the Mentor's weighted dependence terms."""
    z, logits = net.stage_forward(x, plan)
    loss = F.cross_entropy(logits, y)
    if plan.mentor and lambda1:
        loss = loss - lambda1 * nhsic(z, x, sigma)
    if plan.mentor and lambda2:
        onehot = F.one_hot(y, net.model.num_classes).float()
        loss = loss - lambda2 * nhsic(net.projections[plan.stage - 1](z), onehot, sigma)
    return loss, logits


def prepare(net: StageNet, plan: StagePlan, bn_drift: bool) -> list[torch.nn.Parameter]:
    """Freeze everything but the stage's trainable modules; return the parameters to optimise."""
    for p in net.parameters():
        p.requires_grad_(False)
    params = [p for name in plan.trainable_modules(net) for p in net.get_submodule(name).parameters()]
    for p in params:
        p.requires_grad_(True)
    net.set_train_mode(plan, bn_drift)
    return params


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_update(
    net: StageNet,
    task: ClientTask,
    data: TensorDataset,
    cfg: TrainConfig,
    *,
    augment: bool,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    bn_drift: bool = False,
) -> ClientResult:
    """Load the task's tensors, train the stage for `local_epochs`, return only what was trained.

    `loss_fn(x, y)` is the method's objective on `net` (NeuLite's: `stage_loss`).
    """
    started = time.perf_counter()
    plan = task.plan
    assign_arrays(net, task.arrays)
    params = prepare(net, plan, bn_drift)
    optimizer = make_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(task.seed)
    n = len(data)
    total_loss, steps = 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            x, y = data.x[idx], data.y[idx]
            if augment:
                x = random_crop_flip(x, generator=generator)
            loss = loss_fn(x, y)
            if not math.isfinite(loss.item()):
                raise NeuliteError(f"training diverged at round {task.round}, stage {plan.stage}: loss is {loss.item()} (lower train.lr)")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # free gradients before the next forward
            total_loss += loss.item()
            steps += 1
    arrays = extract_arrays(net, net.up_names(plan, bn_drift))
    return ClientResult(arrays, n, {"train_loss": total_loss / max(steps, 1), "train_seconds": time.perf_counter() - started})
