"""Device memory: limits the OS enforces, the budget a node reports under them, training held to a budget."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from neulite.config import load_config
from neulite.device_memory import (
    OutOfMemory,
    available_memory,
    cgroup_limits,
    enforced_limits,
    enforcement,
    run_within,
)
from neulite.errors import NeuliteError
from neulite.federation import train_on_device
from neulite.memory import MIB
from neulite.simulation import Simulation


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def test_cgroup_v2_limits_of_the_group_and_its_parents_count_the_working_set(tmp_path: Path):
    _write(tmp_path, cgroup__controllers="memory")
    _write(
        tmp_path / "fleet", memory__max=str(512 * MIB), memory__current=str(100 * MIB), memory__stat="inactive_file 0\n"
    )
    _write(
        tmp_path / "fleet" / "node-1",
        memory__max=str(64 * MIB),
        memory__current=str(40 * MIB),
        memory__stat=f"anon 1\ninactive_file {10 * MIB}\n",
    )
    _write(tmp_path / "fleet" / "node-2", memory__max="max", memory__current="5")
    limits = cgroup_limits(tmp_path, "0::/fleet/node-1\n")
    assert [(lim.limit, lim.in_use, lim.headroom) for lim in limits] == [
        (64 * MIB, 30 * MIB, 34 * MIB),  # page cache the kernel would reclaim is not in use
        (512 * MIB, 100 * MIB, 412 * MIB),
    ]
    assert [lim.limit for lim in cgroup_limits(tmp_path, "0::/fleet/node-2\n")] == [512 * MIB]  # "max": no limit


def test_cgroup_v1_memory_limits_are_read_and_other_controllers_ignored(tmp_path: Path):
    node = tmp_path / "memory" / "node"
    _write(tmp_path / "memory", memory__limit_in_bytes=str(9223372036854771712), memory__usage_in_bytes="7")
    _write(node, memory__limit_in_bytes=str(32 * MIB), memory__usage_in_bytes=str(8 * MIB))
    limits = cgroup_limits(tmp_path, "4:memory:/node\n3:cpuset:/\n0::/\n")
    assert [(lim.limit, lim.headroom) for lim in limits] == [(32 * MIB, 24 * MIB)]
    assert "cgroup v1" in limits[0].source


def _nothing() -> None:
    return None


def _ones(count: int, _: None) -> float:
    return float(torch.ones(count).sum())


def test_a_data_limit_refuses_what_a_device_lacks_and_the_parent_stays_free():
    with pytest.raises(OutOfMemory, match=r"needed more than its budget of 16.0 MiB \(.*can't allocate memory"):
        run_within(16 * MIB, _nothing, functools.partial(_ones, 64 * MIB // 4), how="RLIMIT_DATA")
    assert available_memory() > 64 * MIB and not enforced_limits()  # the parent is not held
    with pytest.raises(NeuliteError, match="how must be"):
        run_within(16 * MIB, _nothing, _nothing, how="ulimit")


needs_cgroups = pytest.mark.skipif(
    enforcement() != "cgroup v1", reason="needs permission to create memory cgroups (root on cgroup v1)"
)


@needs_cgroups
def test_a_device_between_a_stages_peak_and_full_training_trains_its_stage_but_not_the_full_model():
    """The last NeuLite stage of the default experiment on a device with half-way memory."""
    neulite = Simulation(load_config(overrides=["method.rounds=3", "model.blocks=3"]))
    fedavg = Simulation(load_config(overrides=["method.name=fedavg", "method.rounds=3"]))
    peak = neulite.method.memory(neulite.method.plan(3)).total
    full_peak = fedavg.method.memory(fedavg.method.plan(1)).total
    assert peak < full_peak / 2
    budget = (peak + full_peak) // 2
    cid, task = next(iter(neulite.server.configure(3).tasks.items()))
    result = train_on_device(neulite.node_cfg, cid, task, budget)
    assert result.num_examples == len(neulite.clients[cid].train)
    cid, task = next(iter(fedavg.server.configure(1).tasks.items()))
    with pytest.raises(OutOfMemory, match="the kernel killed it"):
        train_on_device(fedavg.node_cfg, cid, task, budget)


@needs_cgroups
def test_with_enforced_budgets_a_client_that_needs_more_fails_and_the_round_goes_on(caplog):
    cfg = load_config(
        overrides=[
            "data.train_size=400",
            "data.partition=iid",
            "data.num_clients=2",
            "clients.per_round=2",
            "method.name=fedavg",
            "method.rounds=1",
            "train.local_epochs=1",
            "clients.fractions=[0.3, 3.0]",
            "seed=7",  # draws one device below the full model's peak and one at 2.4 times it
            "clients.enforce_budgets=true",
        ]
    )
    with Simulation(cfg) as sim:
        peak = sim.method.memory(sim.method.plan(1)).total
        budgets = {c.cid: c.budget for c in sim.clients}
        record = sim.run_round(1)
    short = {cid for cid, b in budgets.items() if b < peak}
    ample = {cid for cid, b in budgets.items() if b > peak + 3 * MIB}
    assert short and ample  # this seed draws both kinds of device
    failed = {cid for cid in budgets if f"client {cid} left out" in caplog.text}
    assert short <= failed and not ample & failed
    assert record.participants == len(budgets) - len(failed) == 1  # aggregated from the device that trained
