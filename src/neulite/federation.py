"""The clients of an experiment: each one's data shard, validation split and memory budget.

Shared by every driver, so the in-process simulator and Flower see the same federation for the
same config and seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neulite.config import ClientsConfig, Config
from neulite.data import DataSplits, TensorDataset, load_dataset, partition, train_val_split

MB = 2**20


@dataclass(frozen=True)
class Client:
    cid: int
    train: TensorDataset
    val: TensorDataset
    budget: int  # bytes of memory available for training


def _subset(data: TensorDataset, idx: np.ndarray) -> TensorDataset:
    return TensorDataset(data.x[idx], data.y[idx], data.num_classes)


def draw_budgets(cfg: ClientsConfig, n: int, full_peak: int, rng: np.random.Generator) -> list[int]:
    """Memory budgets in bytes: uniform MB range, device tiers, or fractions of full-model training."""
    if cfg.budget == "uniform":
        mb = rng.uniform(*cfg.budget_mb, size=n)
        return [int(v * MB) for v in mb]
    if cfg.budget == "tiers":
        p = np.asarray(cfg.tier_weights, dtype=float)
        mb = rng.choice(np.asarray(cfg.tiers_mb), size=n, p=p / p.sum())
        return [int(v * MB) for v in mb]
    return [int(f * full_peak) for f in rng.uniform(*cfg.fractions, size=n)]


def augment_enabled(cfg: Config, splits: DataSplits) -> bool:
    return splits.augment if cfg.data.augment == "auto" else cfg.data.augment == "on"


def load_splits(cfg: Config) -> DataSplits:
    return load_dataset(cfg.data.name, cfg.data.root or None, seed=cfg.seed)


def make_clients(cfg: Config, splits: DataSplits, full_peak: int) -> list[Client]:
    """Partition the training set, split each shard into train/val, and give each client a budget."""
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
    budgets = draw_budgets(cfg.clients, d.num_clients, full_peak, np.random.default_rng([cfg.seed, 1]))
    clients = []
    for cid, (idx, budget) in enumerate(zip(shards, budgets)):
        train_idx, val_idx = train_val_split(idx, d.val_fraction, cfg.seed + cid)
        clients.append(Client(cid, _subset(splits.train, train_idx), _subset(splits.train, val_idx), budget))
    return clients


def client_seed(seed: int, rnd: int, cid: int) -> int:
    """A seed for one client's local training in one round, independent of who else trains."""
    return int(np.random.SeedSequence([seed, rnd, cid]).generate_state(1)[0])
