"""Headline accuracy comparison under memory heterogeneity (fewer than 20% of clients fit the full model).

Every method of `neulite compare` on the same data, clients and budgets (benchmarks/accuracy.toml),
with Dirichlet(0.5) label skew and with an IID split, over several seeds.
Writes benchmarks/results/accuracy.json ({"methods": ...} for the Dirichlet split, the IID split
under "iid") and keeps the per-run folders in benchmarks/results/accuracy-runs/ so an interrupted
benchmark resumes.  Run: python benchmarks/accuracy.py [--seeds 0,1,2] [--methods a,b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from neulite.compare import compare, machine
from neulite.config import METHODS, load_config

HERE = Path(__file__).parent
OUT = HERE / "results" / "accuracy.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    console = Console()
    info = machine()
    console.print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    start = time.perf_counter()
    results = {}
    for split, overrides in (("dirichlet", ["data.partition=dirichlet", "data.alpha=0.5"]), ("iid", ["data.partition=iid"])):
        cfg = load_config(HERE / "accuracy.toml", overrides)
        console.print(f"[bold]{split}[/bold]")
        runs = HERE / "results" / "accuracy-runs" / split
        results[split] = compare(cfg, methods, seeds, runs, console=console)
        shutil.copy(runs / "comparison.md", HERE / "results" / f"accuracy-{split}.md")
        shutil.copy(runs / "accuracy.png", HERE / "results" / f"accuracy-{split}.png")
    report = {
        "methods": results["dirichlet"]["methods"],
        "target_accuracy": results["dirichlet"]["target_accuracy"],
        "iid": {"methods": results["iid"]["methods"], "target_accuracy": results["iid"]["target_accuracy"]},
        "config": results["dirichlet"]["config"],
        "seeds": seeds,
        "machine": info,
        "seconds": time.perf_counter() - start,
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
