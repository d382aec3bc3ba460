"""The `neulite` command: run an experiment, or print a model's per-stage training memory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from neulite.config import load_config
from neulite.device_memory import run_limited
from neulite.errors import NeuliteError
from neulite.memory import MIB


def _run(args: argparse.Namespace) -> None:
    from neulite.results import ResultsDir
    from neulite.simulation import run_experiment

    if args.resume:
        if args.out is None:
            raise NeuliteError("--resume needs --out DIR (the folder of the run to continue)")
        # --config/--set with --resume are checked against the checkpoint, never silently dropped
        cfg = load_config(args.config, args.set) if args.config else ResultsDir(args.out).load_config(args.set)
    else:
        cfg = load_config(args.config, args.set)
    out = args.out or Path("results") / f"{cfg.method.name}-{datetime.now():%Y%m%d-%H%M%S}"
    console = Console(quiet=args.quiet)
    console.print(
        f"neulite run: {cfg.method.name} on {cfg.data.name} with {cfg.model.name}, {cfg.method.rounds} rounds, {args.engine} engine -> {out}"
    )
    if args.engine == "flower":
        from neulite.flower.simulation import simulate

        if args.workers != 1:
            raise NeuliteError(
                "--workers is the local engine's: Flower's simulation engine runs every node in its own process"
            )
        simulate(cfg, out, resume=args.resume, overwrite=args.overwrite)
    else:
        run_experiment(cfg, out, resume=args.resume, overwrite=args.overwrite, console=console, workers=args.workers)
    console.print(f"results in {out}")


def _compare(args: argparse.Namespace) -> None:
    from neulite.algorithms.registry import METHODS
    from neulite.compare import compare

    cfg = load_config(args.config, args.set)
    methods = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise NeuliteError(f"--methods names no method (valid: {', '.join(METHODS)})")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise NeuliteError(f"unknown method(s) {', '.join(unknown)} (valid: {', '.join(METHODS)})")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise NeuliteError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if bad := [s for s in seeds if not 0 <= s < 2**32]:
        raise NeuliteError(f"--seeds must be integers in [0, 2**32), got {bad[0]}")
    console = Console(quiet=args.quiet)
    compare(cfg, methods, seeds, args.out, target=args.target, console=console, workers=args.workers)
    console.print(f"comparison in {args.out}")


def _memory(args: argparse.Namespace) -> None:
    from neulite.memory_report import memory_report

    shape = _network(args)
    if args.blocks < 0:
        raise NeuliteError(f"--blocks must be >= 0, got {args.blocks}")
    report = memory_report(
        args.model,
        args.batch_size,
        shape,
        args.num_classes,
        args.width,
        args.blocks,
        with_measurement=not args.no_measure,
        recompute=args.recompute == "on",
        device=args.device,
    )
    full = report["full"]
    rows = [full, *report["stages"]]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    table = Table(
        title=f"{args.model} (blocks: {report['blocks']}), batch {args.batch_size}, input {args.input_shape}, "
        f"recompute {args.recompute}, {args.device}: peak training memory"
    )
    for col in ("", "estimated MiB", "measured MiB", "est/meas", "of full"):
        table.add_column(col, justify="right")
    for r in rows:
        m = r["measured_bytes"]
        table.add_row(
            "full model" if r["stage"] == 0 else f"stage {r['stage']}",
            f"{r['estimated_bytes'] / MIB:.1f}",
            "-" if m is None else f"{m / MIB:.1f}",
            "-" if m is None else f"{r['estimated_bytes'] / m:.3f}",
            f"{r['estimated_bytes'] / full['estimated_bytes']:.0%}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"worst stage needs {report['worst_stage_fraction']:.0%} of full-model training: {report['reduction_percent']:.1f}% less peak memory"
    )


def _plan(args: argparse.Namespace) -> None:
    from neulite.planner import plan_blocks

    shape = _network(args)
    try:
        budgets = [int(float(v) * MIB) for v in args.budgets.split(",")]
    except ValueError:
        raise NeuliteError(f"--budgets must be MiB values separated by commas, got {args.budgets!r}") from None
    if min(budgets) <= 0:
        raise NeuliteError("--budgets must be positive")
    with Console(stderr=True).status(f"planning {args.model}") as status:  # on stderr: --json stays clean
        chosen, candidates, full = plan_blocks(
            args.model,
            shape,
            args.num_classes,
            budgets,
            width=args.width,
            batch_size=args.batch_size,
            target=args.target,
            recompute=not args.no_recompute,
            max_blocks=args.max_blocks,
            progress=lambda step: status.update(f"planning {args.model}: {step}"),
        )
    if args.json:
        print(
            json.dumps(
                {
                    "chosen": dataclasses.asdict(chosen),
                    "candidates": [dataclasses.asdict(c) for c in candidates],
                    "full_bytes": full,
                },
                indent=2,
            )
        )
        return
    table = Table(
        title=f"{args.model}, batch {args.batch_size}: {len(budgets)} clients, full-model training {full / MIB:.1f} MiB"
    )
    for col in (
        "blocks",
        "cuts (unit index)",
        "stage peaks, % of full",
        "recomputing",
        "clients fitting each stage",
        "fit all",
        "take part",
    ):
        table.add_column(col, justify="right")
    for c in candidates:
        table.add_row(
            f"{c.blocks}{'' if c.balanced else ' (own)'}{' *' if c is chosen else ''}",
            ",".join(map(str, c.cuts)),
            " ".join(f"{p / full:.0%}" for p in c.stage_peaks),
            "-" if c.recompute_peaks is None else " ".join(f"{p / full:.0%}" for p in c.recompute_peaks),
            " ".join(map(str, c.fits)),
            f"{c.share:.0%}",
            f"{c.take_part:.0%}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"* chosen: model.blocks = {chosen.config_blocks}"
        + ("" if chosen.balanced else " (the network's own blocks)")
        + (' with train.recompute = "auto"' if not args.no_recompute else "")
        + f" ({chosen.share:.0%} of clients fit every stage; target {args.target:.0%})"
    )


WORKERS_HELP = (
    "train each round's clients in N processes, one torch thread each (the same replies as --workers 1 "
    "on one thread, bit for bit; local engine only)"
)


def _limit(args: argparse.Namespace) -> int:
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    return run_limited(command, int(args.memory_mb * MIB))


def _network_arguments(parser: argparse.ArgumentParser, model: str) -> None:
    """The network and batch a memory question is about."""
    parser.add_argument("--model", default=model)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-shape", default="3,32,32", help="C,H,W (an image), C,L (a sequence) or F (a vector)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--width", type=float, default=1.0)


def _network(args: argparse.Namespace) -> tuple[int, ...]:
    """`_network_arguments` checked; the input shape."""
    if args.batch_size < 1:
        raise NeuliteError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_classes < 2:
        raise NeuliteError(f"--num-classes must be >= 2, got {args.num_classes}")
    if not 0 < args.width <= 64:
        raise NeuliteError(f"--width must be in (0, 64], got {args.width}")
    text = args.input_shape
    shape = tuple(int(v) for v in text.split(",")) if text.replace(",", "").isdigit() else ()
    if not 1 <= len(shape) <= 3:
        raise NeuliteError(f"--input-shape must be C,H,W, C,L or F, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neulite", description="Memory-efficient federated learning by progressive block-wise training."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment in the in-process simulator")
    run.add_argument("--config", help="TOML config file (default: built-in defaults = configs/default.toml)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.1",
    )
    run.add_argument("--out", help="results folder (default: results/<method>-<time>)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (--config/--set must then match the run's config)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    run.add_argument(
        "--engine",
        choices=("local", "flower"),
        default="local",
        help="local: the in-process simulator; flower: Flower's simulation engine, one supernode per client (needs the flower extra)",
    )
    run.add_argument("--workers", type=int, default=1, metavar="N", help=WORKERS_HELP)
    run.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    run.set_defaults(func=_run)
    cmp = sub.add_parser("compare", help="run several methods over several seeds on the same data and budgets")
    cmp.add_argument("--config", help="TOML config file shared by every method")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cmp.add_argument("--methods", help="comma-separated method names (default: all)")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    cmp.add_argument(
        "--target", type=float, help="accuracy for rounds/time-to-target (default: ExclusiveFL's final accuracy)"
    )
    cmp.add_argument("--out", default="results/compare", help="comparison folder; re-running resumes it")
    cmp.add_argument("--workers", type=int, default=1, metavar="N", help=WORKERS_HELP)
    cmp.add_argument("--quiet", action="store_true")
    cmp.set_defaults(func=_compare)
    mem = sub.add_parser("memory", help="per-stage peak training memory against full-model training")
    _network_arguments(mem, "resnet34")
    mem.add_argument(
        "--blocks", type=int, default=0, help="0: one block per resolution stage; N: N memory-balanced blocks"
    )
    mem.add_argument(
        "--recompute", choices=("off", "on"), default="off", help="stages that recompute what they train in backward"
    )
    mem.add_argument("--no-measure", action="store_true", help="estimate only (skip the measured training steps)")
    mem.add_argument(
        "--device", default="cpu", help="where the steps are measured: cpu (resident memory) or cuda (allocated bytes)"
    )
    mem.add_argument("--json", action="store_true")
    mem.set_defaults(func=_memory)
    plan = sub.add_parser("plan", help="how many memory-balanced blocks let a target share of clients fit every stage")
    _network_arguments(plan, "resnet18")
    plan.add_argument("--budgets", required=True, help="the clients' memory budgets in MiB, comma-separated")
    plan.add_argument("--target", type=float, default=0.9, help="share of clients that must fit every stage")
    plan.add_argument("--max-blocks", type=int, default=8)
    plan.add_argument("--no-recompute", action="store_true", help='plan without train.recompute = "auto"')
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan)
    limit = sub.add_parser(
        "limit",
        help="run a command (a Flower SuperNode, say) as a device with this much memory",
        description="Run COMMAND in a memory cgroup of its own limited to --memory-mb (cgroup v2 or v1; where this "
        "process may not create one, an RLIMIT_DATA on each process it starts). A node started so reports its "
        'budget from the limit with clients.budget = "measured". Exits with the command\'s status.',
    )
    limit.add_argument("--memory-mb", type=float, required=True, help="the device's memory in MiB")
    limit.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    limit.set_defaults(func=_limit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except NeuliteError as exc:
        print(f"neulite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neulite: interrupted (completed rounds are checkpointed; use --resume)", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
