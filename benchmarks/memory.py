"""Headline memory figures: per-stage NeuLite peak against full-model training, estimated and measured.

ResNet-18/34, VGG-16 and MobileNetV2 on 32x32 inputs at batch 32, 64 and 128.
Writes benchmarks/results/memory.json.  Run: python benchmarks/memory.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from neulite.compare import machine
from neulite.memory import MIB, memory_report

MODELS = ("resnet18", "resnet34", "vgg16", "mobilenetv2")
BATCHES = (32, 64, 128)
OUT = Path(__file__).parent / "results" / "memory.json"


def main() -> None:
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    reports = []
    start = time.perf_counter()
    for model in MODELS:
        for batch in BATCHES:
            r = memory_report(model, batch, (3, 32, 32), 10)
            reports.append(r)
            stages = ", ".join(f"{s['estimated_bytes'] / MIB:.0f}/{s['measured_bytes'] / MIB:.0f}" for s in r["stages"])
            print(
                f"{model:12s} batch {batch:3d}: full {r['full']['estimated_bytes'] / MIB:.0f}/{r['full']['measured_bytes'] / MIB:.0f} MiB (est/meas); "
                f"stages {stages}; worst stage {r['worst_stage_fraction']:.0%} of full",
                flush=True,
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": info, "seconds": time.perf_counter() - start, "reports": reports}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
