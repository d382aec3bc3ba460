"""The frozen-prefix cache: a run with it is bit for bit the run without it, the frozen blocks run
once per stage (extended by one block when the next stage freezes one more), and any change of a
frozen block's tensors or of the data is noticed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neulite.config import load_config
from neulite.data.datasets import TensorDataset
from neulite.errors import NeuliteError
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.prefix_cache import PrefixCache, PrefixStore
from neulite.simulation import Simulation

SMALL = [
    "data.name=digits",
    "data.train_size=600",
    "data.num_clients=4",
    "clients.per_round=4",  # every client every round: stage 3's second round finds every cache filled
    "model.blocks=4",
    "model.width=0.5",
    "method.rounds=5",
    "method.neulite.stage_rounds=[1,1,2,1]",
    "train.local_epochs=1",
    "clients.fractions=[1.1, 1.2]",
    "eval.every=5",
]


def _run(overrides: list[str]) -> tuple[list[tuple], dict[str, torch.Tensor], int]:
    with Simulation(load_config(overrides=[*SMALL, *overrides])) as sim:
        rows = [sim.run_round(rnd) for rnd in range(1, 6)]
        assert rows[-1].accuracy > 0.1  # evaluated at the last round only; chance is 0.1
        cached = sum(cid in sim.prefixes for cid in range(4))
        return [(r.stage, r.train_loss) for r in rows] + [rows[-1].accuracy], sim.method.net.state_dict(), cached


def test_a_run_with_the_cache_is_the_run_without_it_bit_for_bit():
    rows, state, cached = _run([])
    rows_off, state_off, cached_off = _run(["train.prefix_cache_mb=0"])
    assert (cached, cached_off) == (4, 0)
    assert [r[0] for r in rows[:-1]] == [1, 2, 3, 3, 4]  # stage 3 fills and then finds the caches; stage 4 extends them
    assert rows == rows_off
    assert all(torch.equal(state[k], state_off[k]) for k in state)


class _Counting(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block, self.calls = block, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return self.block(x)


def _net() -> tuple[StageNet, list[_Counting]]:
    model = build_model("small_cnn", (1, 8, 8), 10, 0.5, blocks=4)
    counted = [_Counting(b) for b in model.blocks]
    model.blocks = torch.nn.ModuleList(counted)
    net = StageNet(model)
    net.eval()
    return net, counted


def test_the_cache_runs_frozen_blocks_once_per_stage_and_extends_by_the_newly_frozen_block():
    net, blocks = _net()
    data = TensorDataset(torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,)), 10)
    cache = PrefixCache()
    assert cache.prefix(net, net.plan(2, harmonize=True), data) is None  # the Harmonizer trains block 1's tail
    first = cache.prefix(net, net.plan(3, harmonize=True), data)
    assert [b.calls for b in blocks] == [40, 0, 0, 0] and cache.nbytes == first.numel() * 4
    assert cache.prefix(net, net.plan(3, harmonize=True), data) is first
    assert [b.calls for b in blocks] == [40, 0, 0, 0]  # the next round of the stage runs no frozen block
    second = cache.prefix(net, net.plan(4, harmonize=True), data)
    assert [b.calls for b in blocks] == [40, 40, 0, 0]  # the next stage runs only the newly frozen block
    with torch.no_grad():
        assert torch.equal(second, blocks[1](blocks[0](data.x)))
    assert cache.prefix(net, net.plan(4, harmonize=True, bn_drift=True), data) is None


def test_a_changed_frozen_block_or_other_data_recomputes():
    net, blocks = _net()
    data = TensorDataset(torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)), 10)
    cache = PrefixCache()
    plan = net.plan(4, harmonize=True)
    cache.prefix(net, plan, data)
    with torch.no_grad():
        next(blocks[1].parameters()).add_(1e-3)
    cache.prefix(net, plan, data)
    assert [b.calls for b in blocks] == [40, 40, 0, 0]  # the cache holds only the last features: all again
    other = TensorDataset(data.x + 1, data.y, 10)
    features = cache.prefix(net, plan, other)
    assert [b.calls for b in blocks] == [60, 60, 0, 0]
    with torch.no_grad():
        assert torch.equal(features, blocks[1](blocks[0](other.x)))


def test_a_plan_that_reruns_its_frozen_prefix_in_backward_is_not_cached():
    net, blocks = _net()
    data = TensorDataset(torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)), 10)
    plan = dataclasses.replace(net.plan(4, harmonize=True), recompute=True, recompute_prefix=True)
    assert PrefixCache().prefix(net, plan, data) is None
    assert [b.calls for b in blocks] == [0, 0, 0, 0]


def test_the_store_keeps_to_its_budget_least_recently_used_first():
    net, _ = _net()
    plan = net.plan(3, harmonize=True)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)), 10)
    one = PrefixCache()
    one.prefix(net, plan, data)
    store = PrefixStore(max_mb=2.5 * one.nbytes / 2**20)
    for cid in (0, 1, 2):
        store.get(cid).prefix(net, plan, data)
    store.get(0)  # client 0 used again: client 1 is now the least recently used
    store.get(3).prefix(net, plan, data)
    assert [cid for cid in range(4) if cid in store] == [0, 2, 3]  # 1 evicted; 3 may add its own on top
    assert store.nbytes == 3 * one.nbytes
    assert PrefixStore(max_mb=0).get(0) is None


def test_a_negative_cache_budget_is_a_config_error():
    with pytest.raises(NeuliteError, match="train.prefix_cache_mb"):
        load_config(overrides=["train.prefix_cache_mb=-1"])
