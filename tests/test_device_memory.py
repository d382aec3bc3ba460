"""Device memory: limits the OS enforces, the budget a node reports under them, training held to a budget."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from neulite.device_memory import (
    OutOfMemory,
    available_memory,
    cgroup_limits,
    enforced_limits,
    run_within,
)
from neulite.errors import NeuliteError
from neulite.memory import MIB


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


def test_a_node_under_a_limit_reports_that_limit_less_what_it_holds():
    def seen() -> tuple[int, list[str]]:
        return available_memory(), [lim.source for lim in enforced_limits()]

    budget = 40 * MIB
    reported, sources = run_within(budget, seen)
    assert "RLIMIT_DATA" in sources
    assert budget - MIB < reported <= budget  # all but what the check itself allocated
    assert available_memory() > budget  # the parent is not limited


def test_training_held_to_a_budget_fails_clearly_and_leaves_the_parent_whole():
    assert run_within(16 * MIB, lambda: float(torch.ones(MIB // 4).sum())) == MIB // 4
    with pytest.raises(OutOfMemory, match=r"needed more than its budget of 16.0 MiB"):
        run_within(16 * MIB, lambda: torch.ones(64 * MIB // 4).sum())
    with pytest.raises(NeuliteError, match="bad"):
        run_within(16 * MIB, lambda: (_ for _ in ()).throw(NeuliteError("bad")))
    with pytest.raises(OutOfMemory, match=r"died \(exit code -9\)"):
        run_within(16 * MIB, lambda: os.kill(os.getpid(), signal.SIGKILL))
    conv = torch.nn.Conv2d(4, 8, 3)
    conv(torch.randn(2, 4, 6, 6)).sum().backward()  # the parent's kernels still work
