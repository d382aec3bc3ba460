"""Choose a setting on the clients' validation splits (never the test set).

Each sweep runs one method over candidate config overrides and seeds, picks the candidate with the
best median validation accuracy (the union of the clients' validation splits) and records the test
accuracy only for information. Run folders under benchmarks/results/tune-runs/ make a sweep resumable.
Writes benchmarks/results/tune-NAME.json.

Sweeps:
  lambda    the Mentor's λ scale on the embedded default (configs/default.toml);
  lr        the local learning rate of the accuracy benchmark, chosen on the FedAvg oracle so that the
            choice favours no memory-efficient method (every method then shares it);
  schedule  NeuLite's rounds per stage on the accuracy benchmark, at the chosen learning rate;
  inherit   whether a new stage starts from the previous output module, on the accuracy benchmark;
  headline-lr  the local learning rate of the headline benchmark (benchmarks/headline.toml), chosen on
            the FedAvg oracle on the Dirichlet(0.5) split, as `lr` is;
  headline-schedule  NeuLite's rounds per stage on the headline benchmark, at its chosen learning rate.
  headline-stage  elastic NeuLite's local epochs and learning rate per stage on the headline
            benchmark (the first candidate is today's: one epoch at train.lr throughout);
  headline-epochs  the local epochs of every other method on the headline benchmark, chosen on the
            FedAvg oracle as headline-lr is (NeuLite's per-stage epochs were tuned: so are theirs).
  headline-stage-0.1, headline-epochs-0.1, headline-lr-0.1  the same choices on the Dirichlet(0.1)
            split, where each client holds one or two classes and many local steps may drift further.
  headline-rounds-0.1  elastic NeuLite's rounds per stage on the Dirichlet(0.1) split, at its chosen
            epochs and learning rates: its early stages' exits are weak there while its wide windows
            already train the whole network, so shorter early stages may lose nothing.
Run: python benchmarks/tune.py NAME [--workers N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from neulite.compare import run_one
from neulite.config import load_config
from neulite.results import machine

HERE = Path(__file__).parent
ROOT = HERE.parent
DIRICHLET = ("data.partition=dirichlet", "data.alpha=0.5")
SKEWED = ("data.partition=dirichlet", "data.alpha=0.1")


@dataclass(frozen=True)
class Sweep:
    config: Path
    method: str
    candidates: tuple[str | tuple[str, ...], ...]  # one "key=value" override each, or several together
    seeds: tuple[int, ...]
    fixed: tuple[str, ...] = ()


SWEEPS = {
    "lambda": Sweep(
        ROOT / "configs" / "default.toml",
        "neulite",
        tuple(f"method.neulite.lambda_scale={s}" for s in (0.0, 0.5, 1.0, 2.0)),
        (0,),
    ),
    "lr": Sweep(
        HERE / "accuracy.toml",
        "fedavg",
        tuple(f"train.lr={lr}" for lr in (0.05, 0.1, 0.15, 0.2, 0.3)),
        (0, 1),
        DIRICHLET,
    ),
    "schedule": Sweep(
        HERE / "accuracy.toml",
        "neulite",
        (
            "method.neulite.stage_rounds=[8,8,8]",
            "method.neulite.stage_rounds=[6,6,12]",
            "method.neulite.stage_rounds=[4,8,12]",
            "method.neulite.stage_split=params",
        ),
        (0, 1),
        DIRICHLET,
    ),
    "headline-lr": Sweep(
        HERE / "headline.toml",
        "fedavg",
        tuple(f"train.lr={lr}" for lr in (0.02, 0.05, 0.1, 0.01)),  # 0.01 added when 0.02 came out best
        (0,),
        (*DIRICHLET, "eval.every=60"),  # only the final validation accuracy decides
    ),
    "headline-schedule": Sweep(
        HERE / "headline.toml",
        "neulite",
        (
            "method.neulite.stage_split=params",  # [4, 12, 44] rounds
            "method.neulite.stage_rounds=[10,20,30]",
            "method.neulite.stage_split=equal",  # [20, 20, 20]
        ),
        (0,),
        (*DIRICHLET, "eval.every=60"),
    ),
    "headline-stage": Sweep(
        HERE / "headline.toml",
        "neulite-elastic",
        (
            "method.neulite.stage_epochs=[1,1,1]",
            "method.neulite.stage_epochs=[3,2,1]",
            "method.neulite.stage_lr=[0.05,0.03,0.02]",
            "method.neulite.stage_lr=[0.02,0.02,0.01]",
            "method.neulite.stage_epochs=[4,3,1]",
            ("method.neulite.stage_epochs=[3,2,1]", "method.neulite.stage_lr=[0.05,0.03,0.02]"),
            "method.neulite.stage_epochs=[6,4,1]",  # added when [4,3,1] led [3,2,1]
            "method.neulite.stage_epochs=[4,3,2]",
        ),
        (0, 1),
        (*DIRICHLET, "eval.every=60"),
    ),
    "headline-epochs": Sweep(
        HERE / "headline.toml",
        "fedavg",
        ("train.local_epochs=1", "train.local_epochs=2"),
        (0, 1),
        (*DIRICHLET, "eval.every=60"),
    ),
    "headline-stage-0.1": Sweep(
        HERE / "headline.toml",
        "neulite-elastic",
        (
            "method.neulite.stage_epochs=[4,3,2]",  # chosen on Dirichlet(0.5)
            "method.neulite.stage_epochs=[1,1,1]",
            "method.neulite.stage_epochs=[2,2,1]",
            ("method.neulite.stage_epochs=[4,3,2]", "method.neulite.stage_lr=[0.01,0.01,0.01]"),
        ),
        (0,),
        (*SKEWED, "eval.every=60"),
    ),
    "headline-rounds-0.1": Sweep(
        HERE / "headline.toml",
        "neulite-elastic",
        (
            "method.neulite.stage_split=params",  # today's: 4, 12 and 44 rounds
            "method.neulite.stage_rounds=[2,6,52]",
            "method.neulite.stage_rounds=[3,9,48]",
        ),
        (0,),
        (*SKEWED, "eval.every=60", "method.neulite.stage_epochs=[4,3,2]", "method.neulite.stage_lr=[0.01,0.01,0.01]"),
    ),
    "headline-lr-0.1": Sweep(
        HERE / "headline.toml",
        "fedavg",
        ("train.lr=0.02", "train.lr=0.01"),  # 0.01: added when it was elastic NeuLite's best on this split
        (0,),
        (*SKEWED, "eval.every=60"),
    ),
    "headline-epochs-0.1": Sweep(
        HERE / "headline.toml",
        "fedavg",
        ("train.local_epochs=2", "train.local_epochs=1"),
        (0,),
        (*SKEWED, "eval.every=60"),
    ),
    "inherit": Sweep(
        HERE / "accuracy.toml",
        "neulite",
        ("method.neulite.inherit_outputs=false", "method.neulite.inherit_outputs=true"),
        (0, 1),
        DIRICHLET,
    ),
}


def run_sweep(name: str, workers: int = 1) -> dict:
    sweep = SWEEPS[name]
    rows = []
    for choice in sweep.candidates:
        overrides = (choice,) if isinstance(choice, str) else choice
        candidate = " ".join(overrides)
        cfg = load_config(sweep.config, [*sweep.fixed, *overrides])
        out = HERE / "results" / "tune-runs" / name / "+".join(overrides).replace("=", "_")
        val, test = [], []
        for seed in sweep.seeds:
            summary, _ = run_one(cfg, sweep.method, seed, out, Console(), workers=workers)
            val.append(summary["validation_accuracy"])
            test.append(summary["final_accuracy"])
        rows.append(
            {
                "candidate": candidate,
                "validation_accuracy": statistics.median(val),
                "test_accuracy": statistics.median(test),
                "validation_by_seed": val,
            }
        )
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r["validation_accuracy"])
    return {
        "sweep": name,
        "method": sweep.method,
        "config": str(sweep.config.relative_to(ROOT)),
        "fixed": list(sweep.fixed),
        "seeds": list(sweep.seeds),
        "runs": rows,
        "chosen": best["candidate"],
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep", choices=sorted(SWEEPS))
    parser.add_argument("--workers", type=int, default=1, help="client worker processes (results do not depend on it)")
    args = parser.parse_args()
    name = args.sweep
    report = run_sweep(name, args.workers)
    (HERE / "results" / f"tune-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"best by median validation accuracy: {report['chosen']} (machine: {report['machine']['cpu']})")


if __name__ == "__main__":
    main()
