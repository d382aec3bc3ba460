"""Client-side local training of one stage: the only place where gradients are taken."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.config import TrainConfig
from neulite.data.augment import random_crop_flip
from neulite.data.datasets import TensorDataset
from neulite.errors import NeuliteError
from neulite.memory import StepLoss
from neulite.models.arrays import assign_arrays, extract_arrays
from neulite.models.stage_net import StageNet, StagePlan
from neulite.optim import SGD
from neulite.prefix_cache import PrefixCache


def cross_entropy_loss(
    net: StageNet, plan: StagePlan, x: torch.Tensor, y: torch.Tensor, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain objective: cross-entropy of the stage model's logits (every method without a loss of its own)."""
    return F.cross_entropy(net.stage_forward(x, plan, prefix)[1], y)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> SGD:
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_update(
    net: StageNet,
    task: ClientTask,
    data: TensorDataset,
    cfg: TrainConfig,
    *,
    augment: bool,
    loss: StepLoss,
    cache: PrefixCache | None = None,
) -> ClientResult:
    """Load the task's tensors, train the stage for `local_epochs` on `loss`, return only what was
    trained. With a `cache` (and no augmentation) the frozen prefix runs once per stage, not every step."""
    started = time.perf_counter()
    plan = task.plan
    assign_arrays(net, task.arrays)
    optimizer = make_optimizer(net.prepare(plan), cfg)
    prefix = cache.prefix(net, plan, data) if cache is not None and not augment else None
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
            value = loss(net, plan, x, y, None if prefix is None else prefix[idx])
            if not math.isfinite(value.item()):
                raise NeuliteError(
                    f"training diverged at round {task.round}, stage {plan.stage}: loss is {value.item()} (lower train.lr)"
                )
            value.backward()
            optimizer.step()
            optimizer.zero_grad()  # free gradients before the next forward
            total_loss += value.item()
            steps += 1
    if not steps:
        raise NeuliteError(f"{n} training sample(s), fewer than the two a BatchNorm step needs: nothing trained")
    arrays = extract_arrays(net, net.up_names(plan))
    return ClientResult(arrays, n, {"train_loss": total_loss / steps, "train_seconds": time.perf_counter() - started})
