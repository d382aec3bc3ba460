"""The accuracy question at neulite's default compute instead of the 30-minute benchmark's.

benchmarks/accuracy.py must fit 72 runs into about 30 minutes on 2 cores, so every method gets 24
rounds of 1 local epoch on a half-width model, and NeuLite's stages get 2, 5 and 17 rounds.
This benchmark asks what the comparison looks like when the stages get the rounds the method is
meant to have: configs/default.toml (full-width small_cnn, 45 rounds x 2 local epochs, Dirichlet
0.5, 20 clients, budgets uniform in [0.3, 1.1] x the full model's peak) for NeuLite, the FedAvg
oracle and every memory-feasible baseline (ExclusiveFL, AllSmall, HeteroFL, FedRolex, DepthFL,
ProFL), over three seeds: about an hour on 2 cores. The NeuLite ablations are left to the
accuracy benchmark. Writes benchmarks/results/compute.json
(the summary.json format) and compute.md; per-run folders in benchmarks/results/compute-runs/ make
it resumable.  Run: python benchmarks/compute.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from neulite.compare import compare
from neulite.config import load_config

HERE = Path(__file__).parent
RESULTS = HERE / "results"
METHODS = ["fedavg", "exclusivefl", "heterofl", "neulite", "allsmall", "fedrolex", "depthfl", "profl"]


def main() -> None:
    runs = RESULTS / "compute-runs"
    result = compare(load_config(), METHODS, [0, 1, 2], runs, console=Console())
    shutil.copy(runs / "comparison.md", RESULTS / "compute.md")
    (RESULTS / "compute.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'compute.json'}")


if __name__ == "__main__":
    main()
