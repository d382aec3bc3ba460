"""Choose the Mentor's λ scale on the clients' validation splits (never the test set).

Runs the embedded default (configs/default.toml) with METHOD.md's λ curriculum scaled by each
factor (method.lambda_scale), picks the factor with the best validation accuracy (union of the clients' validation
splits), and records the test accuracy only for information.
Writes benchmarks/results/lambda.json.  Run: python benchmarks/tune_lambda.py
"""

from __future__ import annotations

import json
from pathlib import Path

from neulite.compare import machine
from neulite.config import load_config
from neulite.runner import run_experiment

HERE = Path(__file__).parent
ROOT = HERE.parent
SCALES = (0.0, 0.5, 1.0, 2.0)


def main() -> None:
    runs = []
    for scale in SCALES:
        out = HERE / "results" / "lambda-runs" / f"scale{scale}"
        summary_path = out / "summary.json"
        if not summary_path.is_file():
            run_experiment(load_config(ROOT / "configs" / "default.toml", [f"method.lambda_scale={scale}"]), out)
        s = json.loads(summary_path.read_text())
        runs.append({"scale": scale, "lambda1": s["lambda1"], "lambda2": s["lambda2"], "validation_accuracy": s["validation_accuracy"], "test_accuracy": s["final_accuracy"]})
        print(runs[-1], flush=True)
    best = max(runs, key=lambda r: r["validation_accuracy"])
    report = {"runs": runs, "chosen_scale": best["scale"], "chosen": best, "machine": machine(), "config": "configs/default.toml"}
    (HERE / "results" / "lambda.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"best by validation accuracy: scale {best['scale']} (lambda1={best['lambda1']}, lambda2={best['lambda2']})")


if __name__ == "__main__":
    main()
