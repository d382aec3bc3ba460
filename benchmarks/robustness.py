"""What k hostile clients of 10 do to NeuLite's final accuracy, under each aggregation rule.

A small federation (10 clients of scikit-learn's packaged 8x8 digits, all 10 train every round,
every stage fits every client: small enough for 81 runs) in which clients 0..k-1 answer every
round with an attack instead of their honest update, for k = 1 and 2:
  nan        every tensor NaN (refused by the reply check)
  huge       every tensor 1e30 (refused as an outlier update)
  inflate    the honest update claiming 10**12 examples (refused: more than the partition holds)
  sign_flip  the update reversed and tripled, w_sent - 3 (w - w_sent) (finite, in range, plausible)
Each (rule, attack, k) runs over three seeds; the median final test accuracy is reported next to
the clean run's. Writes benchmarks/results/robustness.json; per-run results are kept in
benchmarks/results/robustness-runs/ so an interrupted benchmark resumes.
Run: python benchmarks/robustness.py (or share the runs among processes first:
python benchmarks/robustness.py --worker 1/2 & python benchmarks/robustness.py --worker 2/2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.results import machine
from neulite.simulation import Simulation

HERE = Path(__file__).parent
RESULTS = HERE / "results"
RUNS = RESULTS / "robustness-runs"
RULES = ("mean", "trimmed_mean", "median")
FEDERATION = [
    "method.name=neulite",
    "data.name=digits",
    "data.num_clients=10",
    "clients.per_round=10",
    "clients.fractions=[1.2, 1.3]",
    "train.batch_size=16",
    "method.rounds=9",
    "eval.every=9",
]


def _floats(task: ClientTask, result: ClientResult, f) -> ClientResult:
    arrays = {k: f(task.arrays[k], v) if v.is_floating_point() else v for k, v in result.arrays.items()}
    return ClientResult(arrays, result.num_examples, result.metrics)


ATTACKS = {
    "nan": lambda task, r: _floats(task, r, lambda sent, v: torch.full_like(v, float("nan"))),
    "huge": lambda task, r: _floats(task, r, lambda sent, v: torch.full_like(v, 1e30)),
    "inflate": lambda task, r: ClientResult(r.arrays, 10**12, r.metrics),
    "sign_flip": lambda task, r: _floats(task, r, lambda sent, v: sent - 3 * (v - sent)),
}


def run(rule: str, attack: str | None, k: int, seed: int) -> dict:
    """One federation's final accuracy (None when the run stopped, with the reason)."""
    cfg = load_config(overrides=[*FEDERATION, f"seed={seed}", f"server.aggregation={rule}"])
    sim = Simulation(cfg)
    honest = sim.train

    def train(cid: int, task: ClientTask) -> ClientResult:
        reply = honest(cid, task)
        return ATTACKS[attack](task, reply) if attack and cid < k else reply

    sim.train = train
    try:
        for rnd in range(1, cfg.method.rounds + 1):
            sim.run_round(rnd)
    except NeuliteError as exc:
        return {"accuracy": None, "stopped": str(exc)}
    return {"accuracy": sim.final_accuracy()[0]}


def cached(rule: str, attack: str | None, k: int, seed: int) -> dict:
    path = RUNS / rule / f"{attack or 'clean'}-k{k}-seed{seed}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = {**run(rule, attack, k, seed), "seconds": time.perf_counter() - started}
        path.write_text(json.dumps(result) + "\n")
        print(f"{rule:13s} {attack or 'clean':9s} k={k} seed {seed}: {result['accuracy']}", flush=True)
    return json.loads(path.read_text())


def median(results: list[dict]) -> float | None:
    """Median final accuracy over seeds; a stopped run counts as 0 (the federation produced no model)."""
    return statistics.median(r["accuracy"] if r["accuracy"] is not None else 0.0 for r in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--worker", help="I/N: run only every N-th run from the I-th, write no report")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    if args.worker:
        i, n = (int(v) for v in args.worker.split("/"))
        jobs = [(rule, None, 0, s) for rule in RULES for s in seeds]
        jobs += [(rule, a, k, s) for rule in RULES for a in ATTACKS for k in (1, 2) for s in seeds]
        for job in jobs[i - 1 :: n]:
            cached(*job)
        return
    report: dict = {"rules": {}}
    every: list[dict] = []
    for rule in RULES:
        clean = [cached(rule, None, 0, s) for s in seeds]
        attacks = {f"{a}-k{k}": [cached(rule, a, k, s) for s in seeds] for a in ATTACKS for k in (1, 2)}
        every += clean + [r for runs in attacks.values() for r in runs]
        report["rules"][rule] = {
            "clean": median(clean),
            "attacks": {name: median(runs) for name, runs in attacks.items()},
            "stopped": {name: [r["stopped"] for r in runs if "stopped" in r] for name, runs in attacks.items()},
        }
    report.update(
        federation=FEDERATION,
        attackers="clients 0..k-1 of 10, every round",
        seeds=seeds,
        machine={**machine(), "torch_threads": 1},
        run_seconds_total=sum(r["seconds"] for r in every),
    )
    (RESULTS / "robustness.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / 'robustness.json'}")


if __name__ == "__main__":
    main()
