"""A client's compute per round, stage by stage, against full-model training: the frozen-prefix cache.

On the headline benchmark's setting (benchmarks/headline.toml: full Fashion-MNIST, small_cnn at
width 0.5, 1 local epoch of batch 32), one client's round (its whole shard) is timed for full-model
training and for every NeuLite stage, without the cache, on the round that fills it, and on a round
that finds it filled (every later round of the stage). Also the cache's storage per client. One torch
thread, median of `--repeats` timings each. Writes benchmarks/results/stage-compute.json.
Needs `apt-get install dataset-fashion-mnist`.  Run: python benchmarks/stage_compute.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from neulite.config import load_config
from neulite.prefix_cache import PrefixCache
from neulite.results import machine
from neulite.simulation import Simulation

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override headline.toml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(HERE / "headline.toml", ["data.partition=iid", *args.set])
    with Simulation(cfg) as sim:
        method, data = sim.method, sim.clients[args.client].train

        def seconds(plan, cache=None) -> float:
            task = method.configure_train(1, plan, 0, cfg.seed)
            started = time.perf_counter()
            method.client_update(task, data, augment=False, cache=cache)
            return time.perf_counter() - started

        def median(plan, cache=None, fresh: bool = False) -> float:
            """Median seconds with `cache` (a new empty one each time if `fresh`)."""
            return statistics.median(seconds(plan, PrefixCache() if fresh else cache) for _ in range(args.repeats))

        full = median(method.net.full_plan())
        stages = []
        for plan in method.plans():
            warm = PrefixCache()
            seconds(plan, warm)  # fills it, as the stage's first round does
            stages.append(
                {
                    "stage": plan.stage,
                    "frozen_blocks": method.net.frozen_depth(plan),
                    "seconds_without_cache": median(plan),
                    "seconds_filling_cache": median(plan, fresh=True),
                    "seconds_with_cache": median(plan, warm),
                    "cache_bytes": warm.nbytes,
                }
            )
            for key in ("seconds_without_cache", "seconds_filling_cache", "seconds_with_cache"):
                stages[-1][key.replace("seconds", "share_of_full")] = stages[-1][key] / full
            print(stages[-1], flush=True)
    info = machine()
    report = {
        "machine": f"{info['cpu']}, 1 torch thread, torch {info['torch']}",
        "client_samples": len(data),
        "full_model_seconds": full,
        "stages": stages,
        "repeats": args.repeats,
        "overrides": args.set,
    }
    out = HERE / "results" / "stage-compute.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
