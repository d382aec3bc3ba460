"""Flower: the same 10-client, 3-round NeuLite run through the in-process simulator and through
Flower's simulation engine (Ray, one supernode per client), median wall time of 3 repeats each,
and the bytes each round moves against sending the whole model both ways; then the default
experiment (`neulite run`'s 45 rounds) through both engines, for final-accuracy parity.

Wall time is the whole call as a user sees it (set-up, Ray start-up, rounds, final evaluation,
results folder). Writes benchmarks/results/flower.json.  Run: python benchmarks/flower.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from neulite.algorithms.registry import build_network
from neulite.config import load_config
from neulite.flower.simulation import simulate
from neulite.models.arrays import nbytes
from neulite.results import machine
from neulite.simulation import run_experiment

HERE = Path(__file__).parent
OUT = HERE / "results" / "flower.json"
SETTING = ["method.name=neulite", "data.num_clients=10", "clients.per_round=10", "method.rounds=3"]
REPEATS = 3


def timed(fn, cfg) -> tuple[float, dict, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = fn(cfg, Path(tmp) / "run")
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return wall, summary, rows


def parity() -> dict:
    """The default experiment through both engines: same sampling and bytes; the accuracies differ
    only by floating point (Ray's workers train single-threaded, the in-process simulator on every core)."""
    cfg = load_config(overrides=["method.name=neulite"])
    local, flower = timed(run_experiment, cfg), timed(simulate, cfg)
    return {
        "setting": "configs/default.toml",
        "final_accuracy": {"in_process": local[1]["final_accuracy"], "flower_simulation": flower[1]["final_accuracy"]},
        "wall_seconds": {"in_process": local[0], "flower_simulation": flower[0]},
        "same_sampling_and_bytes": [(r["participants"], r["bytes_down"], r["bytes_up"]) for r in local[2]]
        == [(r["participants"], r["bytes_down"], r["bytes_up"]) for r in flower[2]],
    }


def main() -> None:
    console = Console()
    info = machine()
    console.print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    cfg = load_config(overrides=SETTING)
    runs = {
        "in_process": [timed(run_experiment, cfg) for _ in range(REPEATS)],
        "flower_simulation": [timed(simulate, cfg) for _ in range(REPEATS)],
    }
    with torch.device("meta"):  # only the tensors' sizes are needed
        net = build_network(cfg, (1, 28, 28), 10)
    model_bytes = nbytes(net.model.state_dict())
    rows = runs["flower_simulation"][0][2]
    report = {
        "setting": SETTING,
        "repeats": REPEATS,
        "wall_seconds": {name: statistics.median(w for w, _, _ in r) for name, r in runs.items()},
        "wall_seconds_all": {name: [w for w, _, _ in r] for name, r in runs.items()},
        "final_accuracy": {name: [s["final_accuracy"] for _, s, _ in r] for name, r in runs.items()},
        "rounds": [
            {
                "round": row["round"],
                "stage": row["stage"],
                "participants": row["participants"],
                "bytes_down": row["bytes_down"],
                "bytes_up": row["bytes_up"],
                "whole_model_bytes_each_way": model_bytes * row["participants"],
            }
            for row in rows
        ],
        "parity": parity(),
        "machine": info,
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    console.print(json.dumps({k: report[k] for k in ("wall_seconds", "final_accuracy", "rounds", "parity")}, indent=2))
    console.print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
