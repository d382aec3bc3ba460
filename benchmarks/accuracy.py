"""Headline accuracy comparison under memory heterogeneity (fewer than 20% of clients fit the full model).

Every method of `neulite compare` on the same data, clients and budgets (benchmarks/accuracy.toml),
with Dirichlet(0.5) label skew and with an IID split, over three seeds. The two splits run as two
single-threaded processes side by side (one per core). Writes benchmarks/results/accuracy.json
({"methods": ...} for the Dirichlet split, the IID split under "iid"), the tables and plots as
accuracy-SPLIT.md/png, and keeps per-run folders in benchmarks/results/accuracy-runs/ so an
interrupted benchmark resumes.  Run: python benchmarks/accuracy.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from neulite.algorithms.registry import METHODS
from neulite.compare import compare
from neulite.config import load_config
from neulite.results import machine

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SPLITS = {"dirichlet": ["data.partition=dirichlet", "data.alpha=0.5"], "iid": ["data.partition=iid"]}


def run_split(split: str, methods: list[str], seeds: list[int]) -> None:
    cfg = load_config(HERE / "accuracy.toml", SPLITS[split])
    runs = RESULTS / "accuracy-runs" / split
    result = compare(cfg, methods, seeds, runs, console=Console())
    shutil.copy(runs / "comparison.md", RESULTS / f"accuracy-{split}.md")
    shutil.copy(runs / "accuracy.png", RESULTS / f"accuracy-{split}.png")
    (runs / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--split", choices=sorted(SPLITS), help="run one split in this process")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.split:
        run_split(args.split, args.methods.split(","), seeds)
        return
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--split", s, "--seeds", args.seeds, "--methods", args.methods], env=env
        )
        for s in SPLITS
    ]
    if any(p.wait() != 0 for p in procs):
        sys.exit("a split failed; re-run to resume it")
    results = {s: json.loads((RESULTS / "accuracy-runs" / s / "result.json").read_text()) for s in SPLITS}
    info = {**results["dirichlet"]["machine"], "processes": "2 in parallel (one per split), 1 torch thread each"}
    report = {
        "methods": results["dirichlet"]["methods"],
        "target_accuracy": results["dirichlet"]["target_accuracy"],
        "iid": {"methods": results["iid"]["methods"], "target_accuracy": results["iid"]["target_accuracy"]},
        "config": results["dirichlet"]["config"],
        "seeds": seeds,
        "machine": info,
        "seconds": time.perf_counter() - start,
    }
    (RESULTS / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"machine: {machine()['cpu']}; wrote {RESULTS / 'accuracy.json'} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
