"""The clients of an experiment: each one's data shard, validation split and memory budget.

Shared by every driver, so the in-process simulator and Flower see the same federation for the
same config and seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch

from neulite.algorithms.base import Method
from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.algorithms.registry import build_method, build_network
from neulite.config import ClientsConfig, Config
from neulite.data import DataSplits, TensorDataset, load_dataset, partition, subsample, train_val_split
from neulite.device_memory import available_memory, run_within
from neulite.errors import NeuliteError
from neulite.memory import MIB, estimate
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.planner import BlockPlan, auto_blocks

T = TypeVar("T")


@dataclass(frozen=True)
class Client:
    """A simulated client: index views into the shared training set (its samples are copied out only
    while it trains or validates, so a federation of any size holds the data once) and its budget."""

    cid: int
    data: TensorDataset
    train_indices: np.ndarray
    val_indices: np.ndarray
    budget: int  # bytes of memory available for training

    @property
    def train(self) -> TensorDataset:
        return self.data.take(self.train_indices)

    @property
    def val(self) -> TensorDataset:
        return self.data.take(self.val_indices)


def draw_budgets(cfg: ClientsConfig, n: int, full_peak: int, rng: np.random.Generator) -> list[int]:
    """Memory budgets in bytes: uniform MB range, device tiers, fractions of full-model training, or
    this machine's available memory ("measured", what a real device reports)."""
    if cfg.budget == "measured":
        return [available_memory()] * n
    if cfg.budget == "uniform":
        mb = rng.uniform(*cfg.budget_mb, size=n)
        return [int(v * MIB) for v in mb]
    if cfg.budget == "tiers":
        p = np.asarray(cfg.tier_weights, dtype=float)
        mb = rng.choice(np.asarray(cfg.tiers_mb), size=n, p=p / p.sum())
        return [int(v * MIB) for v in mb]
    return [int(f * full_peak) for f in rng.uniform(*cfg.fractions, size=n)]


def augment_enabled(cfg: Config, splits: DataSplits) -> bool:
    """Whether clients augment (random crop + flip): images only."""
    on = splits.augment if cfg.data.augment == "auto" else cfg.data.augment == "on"
    if on and len(splits.input_shape) != 3:
        raise NeuliteError(
            f"data.augment: random crop + flip needs images, but data set {splits.name!r} holds samples of shape "
            f"{splits.input_shape}: set data.augment = 'off'"
        )
    return on


def load_splits(cfg: Config) -> DataSplits:
    splits = load_dataset(cfg.data.name, cfg.data.root or None, seed=cfg.seed)
    if cfg.data.train_size:
        return replace(splits, train=subsample(splits.train, cfg.data.train_size, cfg.seed))
    return splits


def client_indices(cfg: Config, splits: DataSplits) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every client's (train, validation) indices into the training set, for this config and seed."""
    d = cfg.data
    shards = partition(
        splits.train.y.numpy(),
        d.num_clients,
        d.partition,
        cfg.seed,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
        min_size=math.ceil(cfg.train.batch_size / (1.0 - d.val_fraction)),
        on_small=d.on_small,
    )
    return [train_val_split(idx, d.val_fraction, cfg.seed + cid) for cid, idx in enumerate(shards)]


def simulated_budgets(cfg: Config, full_peak: int) -> list[int]:
    """Every client's budget as the config's budget model draws it (the same for every driver)."""
    return draw_budgets(cfg.clients, cfg.data.num_clients, full_peak, np.random.default_rng([cfg.seed, 1]))


def resolve_blocks(
    cfg: Config, splits: DataSplits, budgets: Sequence[int] | None = None
) -> tuple[Config, BlockPlan | None]:
    """`cfg` with `model.blocks = "auto"` replaced by the planner's choice for `budgets` (by default
    the simulated ones, which every process can compute from the config alone), and that plan;
    any other config as it is, and None."""
    if cfg.model.blocks != "auto":
        return cfg, None
    shape, classes = splits.input_shape, splits.train.num_classes
    if budgets is None:
        whole = StageNet(build_model(cfg.model.name, shape, classes, cfg.model.width))
        full_peak = estimate(whole, whole.full_plan(), cfg.train.batch_size, cross_entropy_loss).total
        budgets = simulated_budgets(cfg, full_peak)
    plan = auto_blocks(cfg, shape, classes, budgets)
    return cfg.replace(model=replace(cfg.model, blocks=plan.config_blocks)), plan


def make_clients(
    cfg: Config, splits: DataSplits, indices: list[tuple[np.ndarray, np.ndarray]], full_peak: int
) -> list[Client]:
    """Each client's train/validation data (from `client_indices`) and budget."""
    budgets = simulated_budgets(cfg, full_peak)
    return [
        Client(cid, splits.train, train, val, budget)
        for cid, ((train, val), budget) in enumerate(zip(indices, budgets, strict=True))
    ]


@dataclass(frozen=True)
class Node:
    """A client as a process of its own holds it (a Flower node, a simulator worker): its shard and
    the method's client-side skeleton."""

    cid: int
    train: TensorDataset
    val: TensorDataset
    augment: bool
    method: Method


def client_data(cfg: Config) -> tuple[DataSplits, list[tuple[np.ndarray, np.ndarray]]]:
    """What a process serving clients loads once from the config alone: the data and the partition
    (the same as every other driver's), whatever `model.blocks` (planned or not) cuts the network."""
    return _client_data(cfg.replace(model=replace(cfg.model, blocks=0)))


@functools.lru_cache(maxsize=2)
def _client_data(cfg: Config) -> tuple[DataSplits, list[tuple[np.ndarray, np.ndarray]]]:
    splits = load_splits(cfg)
    return splits, client_indices(cfg, splits)


@functools.lru_cache(maxsize=2)
def client_method(cfg: Config) -> Method:
    """The method a process serving clients builds once, its network on the meta device (a client
    materialises only what a task sends). Apart from the data: a node answering the profiling
    query needs no network (nor torch's compiler, which building one imports: seconds of a device's
    start)."""
    splits, _ = client_data(cfg)
    cfg, _ = resolve_blocks(cfg, splits)
    with torch.device("meta"):
        return build_method(cfg, build_network(cfg, splits.input_shape, splits.train.num_classes))


def node_examples(cfg: Config, cid: int) -> int:
    """How many training samples client `cid` of the experiment `cfg` holds."""
    return len(client_data(cfg)[1][cid][0])


def load_node(cfg: Config, cid: int) -> Node:
    """Client `cid` of the experiment `cfg`, as a process of its own serves it."""
    splits, indices = client_data(cfg)
    train, val = indices[cid]
    return Node(cid, splits.train.take(train), splits.train.take(val), augment_enabled(cfg, splits), client_method(cfg))


def ready_node(cfg: Config, cid: int, task: ClientTask) -> tuple[Node, ClientTask]:
    """The client's node, after a step on a full batch of its data and one on its last, shorter
    batch: the runtime's one-time set-up for this network (oneDNN's kernels, generated for each
    layer and batch shape: 1-2 MiB on small_cnn) belongs to a device's baseline, as on a device
    that trains every round, not to what a round's training needs."""
    node = load_node(cfg, cid)
    batch = cfg.train.batch_size
    full_and_last = np.arange(min(len(node.train), batch + len(node.train) % batch))
    node.method.client_update(task, node.train.take(full_and_last), augment=False)
    return node, task


def _update(state: tuple[Node, ClientTask]) -> ClientResult:
    node, task = state
    return node.method.client_update(task, node.train, augment=node.augment)


def train_on_device(
    cfg: Config,
    cid: int,
    task: ClientTask,
    budget: int,
    work: Callable[[tuple[Node, ClientTask]], T] = _update,
) -> T:
    """Client `cid`'s update to `task` (or what `work` does with its ready node) as a device with
    `budget` bytes for training makes it: a fresh process that loads the client's shard and has
    trained this network before (`ready_node`), then is held to its budget by the OS (`run_within`;
    no frozen-prefix cache survives it). Raises `OutOfMemory` when the update needs more."""
    return run_within(budget, functools.partial(ready_node, cfg, cid, task), work)
