"""Devices held to their budget by the OS: does a client whose budget lies between a stage's peak
and full-model training's train its stage, and does full-model training fail under the same limit?

Each device is a fresh process (`neulite.device_memory.run_within`): it loads its client's shard and
trains the network one batch (its runtime's baseline), then the OS holds it to its budget: a memory
cgroup of its own where this machine allows one (resident memory, as a device's RAM; an excess is
killed), else RLIMIT_DATA (virtual memory: stricter). On the default experiment (MNIST-5k,
small_cnn, batch 32), for every NeuLite stage the budget is midway between that stage's estimated
peak and full-model training's; the device reports the budget it sees (`available_memory`: its
limit less what it holds), trains its stage, and under the same limit a device tries full-model
training. For each, the least budget that trains (bisected to 0.25 MiB) against the estimate. Then
one round of FedAvg and one of NeuLite with `clients.enforce_budgets = true` on the default budgets:
who trained, who failed, the round going on from the others.
Writes benchmarks/results/devices.json.  Run: python benchmarks/devices.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from neulite.algorithms.payload import ClientTask
from neulite.config import Config, load_config
from neulite.device_memory import OutOfMemory, available_memory, enforcement
from neulite.federation import Node, train_on_device
from neulite.memory import MIB
from neulite.results import machine
from neulite.simulation import Simulation

HERE = Path(__file__).parent
DEFAULT = HERE.parent / "configs" / "default.toml"


def report_and_train(state: tuple[Node, ClientTask]) -> float:
    """The budget the device sees (MiB), then its update."""
    node, task = state
    seen = available_memory() / MIB
    node.method.client_update(task, node.train, augment=node.augment)
    return seen


def on_device(cfg: Config, cid: int, task: ClientTask, budget: int) -> tuple[str, float | None]:
    """("trained" or the failure, the budget the device reported)."""
    try:
        return "trained", train_on_device(cfg, cid, task, budget, work=report_and_train)
    except OutOfMemory as exc:
        return f"failed: {exc}", None


def least_budget(cfg: Config, cid: int, task: ClientTask, estimate: int, step: float = 0.25) -> float | None:
    """The least budget (MiB, to `step`) at which the device trains, between the estimate less 4 MiB
    and plus 8 MiB; None if even that fails."""
    low, high = estimate / MIB - 4, estimate / MIB + 8
    if on_device(cfg, cid, task, int(high * MIB))[0] != "trained":
        return None
    while high - low > step:
        middle = (low + high) / 2
        if on_device(cfg, cid, task, int(middle * MIB))[0] == "trained":
            high = middle
        else:
            low = middle
    return round(high, 2)


def device_rows(repeats: int) -> list[dict]:
    neulite = Simulation(load_config(DEFAULT, ["method.name=neulite"]))  # the paper's stages
    fedavg = Simulation(load_config(DEFAULT, ["method.name=fedavg"]))
    full_peak = fedavg.method.memory(fedavg.method.plan(1)).total
    full_cid, full_task = next(iter(fedavg.server.configure(1).tasks.items()))
    full_needs = least_budget(fedavg.node_cfg, full_cid, full_task, full_peak)
    first_rounds: dict[int, int] = {}
    for rnd in range(neulite.cfg.method.rounds, 0, -1):
        first_rounds[neulite.method.plan(rnd).stage] = rnd
    rows = []
    for stage, rnd in sorted(first_rounds.items()):
        plan = neulite.method.plan(rnd)
        peak = neulite.method.memory(plan).total
        budget = (peak + full_peak) // 2
        cid, task = next(iter(neulite.server.configure(rnd).tasks.items()))
        needs = least_budget(neulite.node_cfg, cid, task, peak)
        for repeat in range(repeats):
            stage_out, reported = on_device(neulite.node_cfg, cid, task, budget)
            full_out, _ = on_device(fedavg.node_cfg, full_cid, full_task, budget)
            rows.append(
                {
                    "stage": stage,
                    "repeat": repeat,
                    "budget_mib": round(budget / MIB, 2),
                    "reported_budget_mib": None if reported is None else round(reported, 2),
                    "assigned_on_report": None
                    if reported is None
                    else neulite.method.assign(plan, int(reported * MIB)) is not None,
                    "stage_peak_mib": round(peak / MIB, 2),
                    "stage_needs_mib": needs,
                    "full_peak_mib": round(full_peak / MIB, 2),
                    "full_needs_mib": full_needs,
                    "stage_outcome": stage_out,
                    "full_outcome": full_out,
                }
            )
            print(rows[-1], flush=True)
    return rows


def round_rows() -> dict[str, dict]:
    """One round of FedAvg and of NeuLite on the default budgets, every client held to its own."""
    rounds = {}
    for method in ("fedavg", "neulite"):
        cfg = load_config(DEFAULT, [f"method.name={method}", "clients.enforce_budgets=true", "clients.per_round=20"])
        with Simulation(cfg) as sim:
            record = sim.run_round(1)
            sampled = min(cfg.clients.per_round, record.eligible)
            peak = record.stage_peak_bytes
            rounds[method] = {
                "stage": record.stage,
                "stage_peak_mib": round(peak / MIB, 2),
                "sampled": sampled,
                "trained": record.participants,
                "failed": sampled - record.participants,
                "budgets_below_peak": sum(c.budget < peak for c in sim.clients),
                "budgets_mib": sorted(round(c.budget / MIB, 1) for c in sim.clients),
                "accuracy_after_round": record.accuracy,
            }
        print(method, rounds[method], flush=True)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    info = machine()
    report = {
        "machine": f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}",
        "mechanism": enforcement(),
        "devices": device_rows(args.repeats),
        "rounds": round_rows(),
    }
    path = HERE / "results" / "devices.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
