"""Devices with enforced memory limits: does a client whose budget lies between a stage's peak and
full-model training's train its stage, and does full-model training fail under the same limit?

Each "device" is a process held to a budget by the OS (`neulite.device_memory.run_within`: a forked
child under `RLIMIT_DATA`, glibc mapping every block of 64 KiB or more on its own so the limit counts
live memory). On the default experiment (MNIST-5k, small_cnn, batch 32), for every NeuLite stage the
budget is midway between that stage's estimated peak and full-model training's; the device reports
the budget it sees (its limit less what it holds: `available_memory`), is assigned the stage on that
report (`Method.assign`), trains its stage, then, under the same limit, tries full-model training.
For each, the least budget that trains (bisected to 0.5 MiB) against the estimate: what a fresh
process needs beyond the estimated peak under this (virtual-memory) limit.
Writes benchmarks/results/devices.json.  Run: python benchmarks/devices.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from neulite.compare import machine
from neulite.config import load_config
from neulite.device_memory import OutOfMemory, available_memory, run_within, warm_up
from neulite.memory import MIB
from neulite.simulation import Simulation

HERE = Path(__file__).parent
DEFAULT = HERE.parent / "configs" / "default.toml"


def outcome(budget: int, work: Callable[[], str]) -> str:
    try:
        return run_within(budget, work)
    except OutOfMemory as exc:
        return f"failed: {exc}"


def least_budget(work: Callable[[], str], estimate: int, step: float = 0.5, most: float = 16.0) -> float | None:
    """The least budget, in MiB and to `step`, at which `work` trains: bisected between the estimate
    less `most` MiB and the estimate plus `most`; None if even that fails."""
    low, high = estimate / MIB - most, estimate / MIB + most
    if outcome(int(high * MIB), work).startswith("failed"):
        return None
    while high - low > step:
        middle = (low + high) / 2
        if outcome(int(middle * MIB), work).startswith("failed"):
            low = middle
        else:
            high = middle
    return round(high, 2)


def device_rows(repeats: int) -> list[dict]:
    """For each NeuLite stage, a device midway between its peak and full training's, `repeats` times."""
    neulite = Simulation(load_config(DEFAULT, ["train.prefix_cache_mb=0"]))
    fedavg = Simulation(load_config(DEFAULT, ["method.name=fedavg", "train.prefix_cache_mb=0"]))
    warm_up()
    full_plan = fedavg.method.plan(1)
    full_peak = fedavg.method.memory(full_plan).total
    cid, full_task = next(iter(fedavg.server.configure(1).tasks.items()))
    data = fedavg.clients[cid].train
    rows = []
    first_rounds = {}  # each stage's first round
    for rnd in range(neulite.cfg.method.rounds, 0, -1):
        first_rounds[neulite.method.plan(rnd).stage] = rnd
    for stage, rnd in sorted(first_rounds.items()):
        plan = neulite.method.plan(rnd)
        peak = neulite.method.memory(plan).total
        budget = (peak + full_peak) // 2
        task = neulite.server.configure(rnd).tasks
        stage_cid, stage_task = next(iter(task.items()))

        def update_stage(task=stage_task, cid=stage_cid) -> str:
            neulite.method.client_update(task, neulite.clients[cid].train, augment=neulite.augment)
            return "trained"

        def train_stage(plan=plan, update=update_stage) -> str:
            seen = available_memory()
            if neulite.method.assign(plan, seen) is None:
                return f"not assigned: reported {seen / MIB:.1f} MiB"
            return f"{update()} (reported {seen / MIB:.1f} MiB)"

        def train_full() -> str:
            fedavg.method.client_update(full_task, data, augment=fedavg.augment)
            return "trained"

        needs = {"stage": least_budget(update_stage, peak), "full": least_budget(train_full, full_peak)}
        for repeat in range(repeats):
            stage_out = outcome(budget, train_stage)
            full_out = outcome(budget, train_full)
            reported = float(stage_out.split("reported ")[1].split(" MiB")[0]) if "reported" in stage_out else None
            rows.append(
                {
                    "stage": stage,
                    "repeat": repeat,
                    "budget_mib": round(budget / MIB, 2),
                    "reported_budget_mib": reported,
                    "stage_peak_mib": round(peak / MIB, 2),
                    "full_peak_mib": round(full_peak / MIB, 2),
                    "stage_outcome": stage_out,
                    "full_outcome": full_out,
                    "stage_needs_mib": needs["stage"],
                    "full_needs_mib": needs["full"],
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    info = machine()
    report = {
        "machine": f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}",
        "mechanism": "RLIMIT_DATA on a forked child, glibc mmap threshold 64 KiB",
        "devices": device_rows(args.repeats),
    }
    path = HERE / "results" / "devices.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
