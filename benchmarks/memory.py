"""Headline memory figures: per-stage NeuLite peak against full-model training, estimated and measured.

ResNet-18/34, VGG-16 and MobileNetV2 on 32x32 inputs at batch 32, 64 and 128, with one block per
resolution stage, and ResNet-34 cut into 4 memory-balanced blocks (`model.blocks = 4`).
Writes benchmarks/results/memory.json; entries already there are kept (delete the file to redo all).
Run: python benchmarks/memory.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from neulite.compare import machine
from neulite.memory import MIB
from neulite.memory_report import memory_report

MODELS = (("resnet18", 0), ("resnet34", 0), ("vgg16", 0), ("mobilenetv2", 0), ("resnet34", 4))
BATCHES = (32, 64, 128)
OUT = Path(__file__).parent / "results" / "memory.json"


def main() -> None:
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    old = json.loads(OUT.read_text()) if OUT.is_file() else {"reports": [], "seconds": 0.0}
    done = {(r["model"], r["blocks"], r["batch_size"]): r for r in old["reports"]}
    reports = []
    start = time.perf_counter() - old["seconds"]
    for model, blocks in MODELS:
        for batch in BATCHES:
            label = "one per resolution stage" if not blocks else f"{blocks} memory-balanced"
            r = done.get((model, label, batch)) or memory_report(model, batch, (3, 32, 32), 10, blocks=blocks)
            reports.append(r)
            stages = ", ".join(f"{s['estimated_bytes'] / MIB:.0f}/{s['measured_bytes'] / MIB:.0f}" for s in r["stages"])
            print(
                f"{model:12s} {label:24s} batch {batch:3d}: full {r['full']['estimated_bytes'] / MIB:.0f}/{r['full']['measured_bytes'] / MIB:.0f} MiB (est/meas); "
                f"stages {stages}; worst stage {r['worst_stage_fraction']:.0%} of full",
                flush=True,
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps({"machine": info, "seconds": time.perf_counter() - start, "reports": reports}, indent=2) + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
