"""The `neulite` command: run an experiment, or print a model's per-stage training memory."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.federation import MB


def _run(args: argparse.Namespace) -> None:
    from neulite.results import ResultsDir
    from neulite.runner import run_experiment

    if args.resume:
        if args.out is None:
            raise NeuliteError("--resume needs --out DIR (the folder of the run to continue)")
        cfg = ResultsDir(args.out).load_config()
    else:
        cfg = load_config(args.config, args.set)
    out = args.out or Path("results") / f"{cfg.method.name}-{datetime.now():%Y%m%d-%H%M%S}"
    console = Console(quiet=args.quiet)
    console.print(f"neulite run: {cfg.method.name} on {cfg.data.name} with {cfg.model.name}, {cfg.method.rounds} rounds -> {out}")
    run_experiment(cfg, out, resume=args.resume, console=console)
    console.print(f"results in {out}")


def _memory(args: argparse.Namespace) -> None:
    from neulite.memory import estimate, measure
    from neulite.models.stage_net import StageNet
    from neulite.models.zoo import build_model

    shape = tuple(int(v) for v in args.input_shape.split(","))
    if len(shape) != 3:
        raise NeuliteError(f"--input-shape must be C,H,W, got {args.input_shape!r}")
    net = StageNet(build_model(args.model, shape, args.num_classes, args.width))  # type: ignore[arg-type]
    plans = [net.plan(0)] + [net.plan(t, harmonize=True, mentor=True) for t in range(1, net.num_stages + 1)]
    rows = []
    for plan in plans:
        est = estimate(net, plan, args.batch_size)
        rows.append({
            "stage": plan.stage,
            "estimated_bytes": est.total,
            "measured_bytes": None if args.no_measure else measure(net, plan, args.batch_size),
            "breakdown": est.as_dict(),
        })
    full, stages = rows[0], rows[1:]
    for r in stages:
        r["fraction_of_full"] = r["estimated_bytes"] / full["estimated_bytes"]
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "input_shape": list(shape),
        "full": full,
        "stages": stages,
        "worst_stage_fraction": max(r["fraction_of_full"] for r in stages),
        "reduction_percent": 100.0 * (1.0 - max(r["fraction_of_full"] for r in stages)),
        "measured_with": None if args.no_measure else "torch.profiler allocator events, fresh process, 2 training steps",
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{args.model}, batch {args.batch_size}, input {args.input_shape}: peak training memory")
    for col in ("", "estimated MiB", "measured MiB", "est/meas", "of full"):
        table.add_column(col, justify="right")
    for r in rows:
        m = r["measured_bytes"]
        table.add_row(
            "full model" if r["stage"] == 0 else f"stage {r['stage']}",
            f"{r['estimated_bytes'] / MB:.1f}",
            "-" if m is None else f"{m / MB:.1f}",
            "-" if m is None else f"{r['estimated_bytes'] / m:.3f}",
            f"{r['estimated_bytes'] / full['estimated_bytes']:.0%}",
        )
    console = Console()
    console.print(table)
    console.print(f"worst stage needs {report['worst_stage_fraction']:.0%} of full-model training: {report['reduction_percent']:.1f}% less peak memory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neulite", description="Memory-efficient federated learning by progressive block-wise training.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment in the in-process simulator")
    run.add_argument("--config", help="TOML config file (default: built-in defaults = configs/default.toml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set train.lr=0.1")
    run.add_argument("--out", help="results folder (default: results/<method>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    run.set_defaults(func=_run)
    mem = sub.add_parser("memory", help="per-stage peak training memory against full-model training")
    mem.add_argument("--model", default="resnet34")
    mem.add_argument("--batch-size", type=int, default=64)
    mem.add_argument("--input-shape", default="3,32,32", help="C,H,W")
    mem.add_argument("--num-classes", type=int, default=10)
    mem.add_argument("--width", type=float, default=1.0)
    mem.add_argument("--no-measure", action="store_true", help="estimate only (skip the profiled training steps)")
    mem.add_argument("--json", action="store_true")
    mem.set_defaults(func=_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NeuliteError as exc:
        print(f"neulite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neulite: interrupted (completed rounds are checkpointed; use --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
