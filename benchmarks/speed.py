"""Speed: time to reach ExclusiveFL's final accuracy per method, and the simulator's overhead.

1. Rounds and wall seconds until each method's evaluated accuracy first reaches ExclusiveFL's final
   accuracy, from the accuracy benchmark's Dirichlet runs (run or resumed here, never repeated).
2. Overhead: the same FedAvg rounds through `Simulation` and through a bare PyTorch loop (same model,
   clients, sampled sets, local steps and weighted averaging), run in alternation so that drift in
   the machine's speed hits both alike; medians of 7 repeats each.
Writes benchmarks/results/speed.json.  Run: python benchmarks/speed.py
(`--overhead-only` re-measures the overhead and keeps the committed per-method figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from neulite.algorithms.registry import METHODS
from neulite.compare import compare
from neulite.config import load_config
from neulite.optim import SGD
from neulite.results import machine
from neulite.server import client_seed
from neulite.simulation import Simulation

HERE = Path(__file__).parent
OUT = HERE / "results" / "speed.json"
OVERHEAD = ["method.name=fedavg", "method.rounds=10", "eval.every=10"]
REPEATS = 7


def simulator_seconds(cfg) -> float:
    sim = Simulation(cfg)
    start = time.perf_counter()
    for rnd in range(1, cfg.method.rounds + 1):
        sim.run_round(rnd)
    return time.perf_counter() - start


def bare_torch_seconds(cfg) -> float:
    """The same rounds written directly in PyTorch: the floor the simulator is measured against."""
    sim = Simulation(cfg)  # only for identical data, clients and initial weights
    model = sim.method.net.model
    clients = sim.clients
    rng = np.random.default_rng([cfg.seed, 2])
    t = cfg.train
    start = time.perf_counter()
    for rnd in range(1, cfg.method.rounds + 1):
        chosen = sorted(rng.choice(len(clients), size=cfg.clients.per_round, replace=False))
        states, sizes = [], []
        for i in chosen:
            client = clients[i]
            local = copy.deepcopy(model).train()
            opt = SGD(local.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
            g = torch.Generator().manual_seed(client_seed(cfg.seed, rnd, client.cid))
            for _ in range(t.local_epochs):
                order = torch.randperm(len(client.train), generator=g)
                for s in range(0, len(order), t.batch_size):
                    idx = order[s : s + t.batch_size]
                    if len(idx) < 2:
                        continue
                    loss = F.cross_entropy(local(client.train.x[idx]), client.train.y[idx])
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
            states.append(local.state_dict())
            sizes.append(len(client.train))
        total = sum(sizes)
        new = {
            k: sum(s[k].double() * (n / total) for s, n in zip(states, sizes, strict=True)).to(v.dtype)
            if v.is_floating_point()
            else torch.stack([s[k] for s in states]).amax(0)
            for k, v in model.state_dict().items()
        }
        model.load_state_dict(new)
        if rnd % cfg.eval.every == 0:
            model.eval()
            with torch.inference_mode():
                model(sim.splits.test.x).argmax(1)
    return time.perf_counter() - start


def overhead() -> dict:
    cfg = load_config(HERE / "accuracy.toml", OVERHEAD)
    pairs = [(simulator_seconds(cfg), bare_torch_seconds(cfg)) for _ in range(REPEATS)]
    sim_s = statistics.median(p[0] for p in pairs)
    bare_s = statistics.median(p[1] for p in pairs)
    return {
        "simulator_seconds": sim_s,
        "bare_torch_seconds": bare_s,
        "ratio": sim_s / bare_s,
        "pairs": pairs,
        "setting": OVERHEAD,
        "repeats": REPEATS,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overhead-only", action="store_true")
    args = parser.parse_args()
    console = Console()
    info = machine()
    console.print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    if args.overhead_only:
        report = json.loads(OUT.read_text())
        report["overhead"] = {**overhead(), "machine": info}
    else:
        cfg = load_config(HERE / "accuracy.toml", ["data.partition=dirichlet", "data.alpha=0.5"])
        comparison = compare(
            cfg, list(METHODS), [0, 1, 2], HERE / "results" / "accuracy-runs" / "dirichlet", console=console
        )
        methods = {
            m: {k: r[k] for k in ("seconds_to_target", "rounds_to_target", "client_seconds_to_target", "wall_seconds")}
            for m, r in comparison["methods"].items()
        }
        report = {
            "methods": methods,
            "target_accuracy": comparison["target_accuracy"],
            "overhead": {**overhead(), "machine": info},
            "machine": info,
        }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    console.print(json.dumps({k: v for k, v in report["overhead"].items() if k != "pairs"}, indent=2))
    console.print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
