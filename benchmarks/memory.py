"""Headline memory figures: per-stage NeuLite peak against full-model training, estimated and
measured, without and with recomputation (`train.recompute`), and each step's time on one thread.

ResNet-18/34, VGG-16, MobileNetV2 and vit_tiny on 32x32 inputs at batch 32, 64 and 128, with one block per
resolution stage, ResNet-34 cut into 4 memory-balanced blocks (`model.blocks = 4`), and ResNet-18,
ResNet-34 and VGG-16 into 8 (finer cuts: the weight-bound last stages shrink); the two
user CNNs of examples/user_cnns.py (one block per conv) at batch 32 and 64: weight-heavy
`heavy_cnn` on 8x8 inputs, VGG-like `plain_cnn` on 32x32. For those the full model's peak is also
read by benchmarks/rss_check.py, an independent check of the measurement.
Writes benchmarks/results/memory.json after each row; rows already there measured the current way are
kept (delete the file to redo all). Run on an idle machine (the step times):
OMP_NUM_THREADS=1 python benchmarks/memory.py [--only user_cnns] [--batch 64]  (only: rows whose model name holds it)
At batch 64 it also measures what train.recompute = "auto" gives a client whose budget is issue 13's
target share of full-model training (`AT_BUDGET`: the configurations that meet it), into "at_budget":
the cheapest recomputation each stage needs at that budget, and its time.
On a GPU, `--device cuda` measures allocated bytes and times steps there, into memory-cuda.json.
After a change to the estimator, `--estimates-only` re-estimates the rows, keeping their measurements;
`--retime` also times again the steps of the rows with recomputing stages (timed on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the user models are imported as examples.user_cnns

from rss_check import resident_peak  # noqa: E402

from examples.user_cnns import heavy_cnn, plain_cnn  # noqa: E402
from neulite.algorithms.local import cross_entropy_loss  # noqa: E402
from neulite.errors import NeuliteError  # noqa: E402
from neulite.memory import MIB  # noqa: E402
from neulite.memory_report import blocks_label, measured_with, memory_report, reestimated  # noqa: E402
from neulite.models.stage_net import StageNet  # noqa: E402
from neulite.results import machine  # noqa: E402

MODELS = (
    ("resnet18", 0),
    ("resnet34", 0),
    ("vgg16", 0),
    ("mobilenetv2", 0),
    ("resnet34", 4),
    ("vit_tiny", 0),
    ("resnet18", 8),
    ("resnet34", 8),
    ("vgg16", 8),
)
BATCHES = (32, 64, 128)
AT_BUDGET = (
    ("resnet18", 8, 0.35),
    ("resnet34", 8, 0.25),
    ("vgg16", 8, 0.40),
    ("mobilenetv2", 0, 0.40),
)
"""(model, model.blocks, share of full-model training): issue 13's targets (batch 64), each for the
configurations that meet it."""
USER_MODELS = ((heavy_cnn, (3, 8, 8)), (plain_cnn, (3, 32, 32)))
USER_BATCHES = (32, 64)
RESULTS = Path(__file__).parent / "results"


def user_report(
    build: Any, input_shape: tuple[int, int, int], batch: int, recompute: bool, device: str
) -> dict[str, Any]:
    """memory_report's figures for a user model, and on a CPU the full model's peak as rss_check reads it."""
    name = f"{build.__module__}:{build.__name__}"
    report = memory_report(name, batch, input_shape, 10, recompute=recompute, with_timing=True, device=device)
    if device == "cpu":
        net = StageNet(build(input_shape, 10))
        report["full"]["rss_check_bytes"] = resident_peak(net, net.full_plan(), batch, cross_entropy_loss)
    return report


def main() -> None:
    """Measure every row not yet measured the current way, saving after each (an interrupted run resumes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="measure only the rows whose model name holds this")
    parser.add_argument("--batch", type=int, default=0, help="measure only the rows at this batch size")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: GPU allocated bytes and step times")
    parser.add_argument("--out", help="report file (default: results/memory.json, or memory-cuda.json)")
    parser.add_argument(
        "--estimates-only",
        action="store_true",
        help="re-estimate every row in the report, keeping its measurements (after a change to the estimator)",
    )
    parser.add_argument(
        "--retime",
        action="store_true",
        help="as --estimates-only for the rows with recomputing stages, timing their steps again (on an idle machine)",
    )
    args = parser.parse_args()
    only, device = args.only, args.device
    out = Path(args.out) if args.out else RESULTS / ("memory.json" if device == "cpu" else "memory-cuda.json")
    info = machine()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info.get('gpu', 'no GPU')}")
    old = json.loads(out.read_text()) if out.is_file() else {"reports": [], "seconds": 0.0}
    rows = {_key(r): r for r in [*old["reports"], *old.get("at_budget", [])]}
    start = time.perf_counter() - old["seconds"]
    if args.estimates_only or args.retime:
        reestimate(old, out, lambda r: only in r["model"] and args.batch in (0, r["batch_size"]), args.retime)
        return
    jobs: list[tuple[Key, Callable[[], dict[str, Any]]]] = []
    for batch in sorted(BATCHES, key=lambda b: b != 64):  # batch 64 first: the targets' batch
        jobs += [
            _job(model, blocks, batch, device, recompute) for model, blocks in MODELS for recompute in (False, True)
        ]
        for build, shape in USER_MODELS if batch in USER_BATCHES else ():
            for recompute in (False, True):
                key = (f"{build.__module__}:{build.__name__}", blocks_label(0), batch, recompute, None)
                jobs.append((key, partial(user_report, build, shape, batch, recompute, device)))
        jobs += [_job(model, blocks, batch, device, budget=share) for model, blocks, share in AT_BUDGET if batch == 64]
    out.parent.mkdir(parents=True, exist_ok=True)
    for key, run in jobs:
        if only not in key[0] or args.batch not in (0, key[2]):
            continue
        if rows.get(key, {}).get("measured_with") != measured_with(device):
            rows[key] = {**run(), "recompute": key[3]}
            ordered = [rows[k] for k, _ in jobs if k in rows]
            report = {
                "machine": info,
                "seconds": time.perf_counter() - start,
                "reports": [r for r in ordered if "budget_fraction" not in r],
                "at_budget": [r for r in ordered if "budget_fraction" in r],
            }
            out.write_text(json.dumps(report, indent=2) + "\n")
        show(rows[key])
    print(f"wrote {out}")


def reestimate(old: dict[str, Any], out: Path, chosen: Callable[[dict[str, Any]], bool], retime: bool) -> None:
    """Re-estimate the `chosen` rows of the report `old` (with `retime`, those with recomputing
    stages, timing their steps again), writing `out` after each; a row whose plans changed is dropped."""
    sections = {section: old.get(section, []) for section in ("reports", "at_budget")}
    for rows in sections.values():
        for i, r in enumerate(rows):
            if not chosen(r) or (retime and not any("plain_step_seconds" in stage for stage in r["stages"])):
                continue
            try:
                rows[i] = reestimated(r, retime=retime)
                show(rows[i])
            except NeuliteError as exc:  # the next run without --estimates-only measures it anew
                rows[i] = None
                print(f"dropped: {exc}", flush=True)
            kept = {name: [row for row in listed if row is not None] for name, listed in sections.items()}
            out.write_text(json.dumps({**old, **kept}, indent=2) + "\n")


Key = tuple[str, str, int, bool, float | None]
"""A row's model, blocks, batch size, recomputation, and budget share (rows at a budget)."""


def _job(
    model: str, blocks: int, batch: int, device: str, recompute: bool = False, budget: float | None = None
) -> tuple[Key, Callable[[], dict[str, Any]]]:
    """A built-in model's row on 32x32 inputs, its steps timed: recomputing side by side with the
    plain row (the time recomputation costs), or at a budget."""
    run = partial(
        memory_report,
        model,
        batch,
        (3, 32, 32),
        10,
        blocks=blocks,
        recompute=recompute,
        budget=budget,
        with_timing=True,
        device=device,
    )
    return (model, blocks_label(blocks), batch, recompute, budget), run


def _key(r: dict[str, Any]) -> Key:
    return (r["model"], r["blocks"], r["batch_size"], r.get("recompute", False), r.get("budget_fraction"))


def show(r: dict[str, Any]) -> None:
    stages = ", ".join(
        f"{s['estimated_bytes'] / MIB:.0f}/{s['measured_bytes'] / MIB:.0f}"
        + (f" ({s['step_seconds'] / r['full']['step_seconds']:.2f}x time)" if "step_seconds" in s else "")
        + (f" recomputing {s['step_seconds'] / s['plain_step_seconds'] - 1:+.0%}" if "plain_step_seconds" in s else "")
        for s in r["stages"]
    )
    check = f", rss_check {r['full']['rss_check_bytes'] / MIB:.1f}" if "rss_check_bytes" in r["full"] else ""
    print(
        f"{r['model']:12s} {r['blocks']:24s} batch {r['batch_size']:3d}{' recompute' if r.get('recompute') else ''}"
        f"{' at ' + format(r['budget_fraction'], '.0%') + ' budget' if 'budget_fraction' in r else ''}: full {r['full']['estimated_bytes'] / MIB:.0f}/{r['full']['measured_bytes'] / MIB:.0f} MiB (est/meas{check}); "
        f"stages {stages}; worst stage {r['worst_stage_fraction']:.0%} of full",
        flush=True,
    )


if __name__ == "__main__":
    main()
