"""Device memory: limits the OS enforces, the budget a node reports under them, training held to a budget."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

from neulite import device_memory
from neulite.cli import main
from neulite.config import load_config
from neulite.device_memory import (
    OutOfMemory,
    available_memory,
    cgroup_limits,
    enforced_limits,
    enforcement,
    group_home,
    memory_group,
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


def test_a_memory_group_is_made_beside_a_v2_group_and_under_a_v1_group(tmp_path: Path):
    v2 = tmp_path / "v2"
    _write(v2, cgroup__controllers="cpu memory")
    _write(v2 / "fleet", cgroup__subtree_control="cpu memory\n")
    (v2 / "fleet" / "node-1").mkdir()
    home = group_home(v2, "0::/fleet/node-1\n")
    assert home == ("cgroup v2", v2 / "fleet")  # a v2 group with processes in it cannot have children
    group = memory_group("device", 64 * MIB, home)
    assert (group / "memory.max").read_text() == str(64 * MIB)
    _write(v2 / "fleet", cgroup__subtree_control="cpu\n")
    assert group_home(v2, "0::/fleet/node-1\n") is None  # the memory controller is not passed down
    _write(v2, cgroup__subtree_control="memory")
    assert group_home(v2, "0::/\n") == ("cgroup v2", v2)  # the root group may hold both
    v1 = tmp_path / "v1"
    (v1 / "memory" / "node").mkdir(parents=True)
    assert group_home(v1, "4:memory:/node\n3:cpuset:/\n0::/\n") == ("cgroup v1", v1 / "memory" / "node")
    group = memory_group("device", 32 * MIB, ("cgroup v1", v1 / "memory" / "node"))
    assert (group / "memory.limit_in_bytes").read_text() == str(32 * MIB)


TOUCH = "b = bytearray({mb} << 20); b[::4096] = bytes(len(b[::4096])); print('allocated {mb} MiB')"


@pytest.mark.parametrize("how", ["enforced here", "RLIMIT_DATA"])
def test_neulite_limit_runs_a_command_as_a_device_with_that_memory(monkeypatch, capfd, how: str):
    if how == "RLIMIT_DATA":
        monkeypatch.setattr(device_memory, "enforcement", lambda: "RLIMIT_DATA")
    assert main(["limit", "--memory-mb", "64", "--", sys.executable, "-c", TOUCH.format(mb=16)]) == 0
    status = main(["limit", "--memory-mb", "64", "--", sys.executable, "-c", TOUCH.format(mb=256)])
    out, err = capfd.readouterr()
    assert "allocated 16 MiB" in out and "allocated 256 MiB" not in out
    if how == "RLIMIT_DATA" or enforcement() == "RLIMIT_DATA":
        assert status == 1 and "MemoryError" in err  # the allocation refused
    else:
        assert status == 128 + 9 and "the kernel killed 1 process(es) that needed more than 64 MiB" in err
    home = group_home()
    assert home is None or not (home[1] / f"neulite-node-{os.getpid()}").exists()  # the group goes with the command
    assert main(["limit", "--memory-mb", "64"]) == 2
    assert "no command to run" in capfd.readouterr().err


def _nothing() -> None:
    return None


def test_a_data_limit_refuses_what_a_device_lacks_and_the_parent_stays_free():
    with pytest.raises(OutOfMemory, match=r"needed more than its budget of 16.0 MiB \(.*can't allocate memory"):
        run_within(
            16 * MIB, functools.partial(int, 64 * MIB // 4), torch.ones, how="RLIMIT_DATA"
        )  # the child imports torch alone
    assert available_memory() > 64 * MIB and not enforced_limits()  # the parent is not held
    with pytest.raises(NeuliteError, match="how must be"):
        run_within(16 * MIB, _nothing, _nothing, how="ulimit")
    with pytest.raises(NeuliteError, match="budget must be a positive number of bytes, got -5"):
        run_within(-5, _nothing, _nothing)


needs_cgroups = pytest.mark.skipif(enforcement() == "RLIMIT_DATA", reason="needs permission to create memory cgroups")


SMALL = [
    "data.train_size=200",
    "data.partition=iid",
    "data.num_clients=2",
    "clients.per_round=2",
    "train.local_epochs=1",
]


@needs_cgroups
def test_a_device_between_a_stages_peak_and_full_training_trains_the_stage_and_its_round_goes_on(caplog):
    """seed 7 draws one device at 0.6x full-model training's estimated peak and one at 2.4x."""
    fedavg = load_config(
        overrides=[
            *SMALL,
            "seed=7",
            "clients.fractions=[0.3, 3.0]",
            "method.name=fedavg",
            "clients.enforce_budgets=true",
        ]
    )
    with Simulation(fedavg) as sim:
        full_peak = sim.method.memory(sim.method.plan(1)).total
        budgets = {c.cid: c.budget for c in sim.clients}
        record = sim.run_round(1)
    (short,) = [cid for cid, b in budgets.items() if b < full_peak]
    (ample,) = [cid for cid, b in budgets.items() if b > full_peak + 3 * MIB]
    assert f"client {short} left out" in caplog.text and "the kernel killed it" in caplog.text
    assert f"client {ample} left out" not in caplog.text
    assert record.participants == 1  # the round went on from the device that trained

    neulite = Simulation(load_config(overrides=[*SMALL, "seed=7", "model.blocks=3", "method.rounds=3"]))
    peak = neulite.method.memory(neulite.method.plan(3)).total
    assert peak + 3 * MIB < budgets[short]  # the short device lies between the last stage's peak and the full model's
    cid, task = next(iter(neulite.server.configure(3).tasks.items()))
    result = train_on_device(neulite.node_cfg, cid, task, budgets[short])
    assert result.num_examples == len(neulite.clients[cid].train)
