"""`neulite compare`: several methods over several seeds on the same data, clients and budgets.

Each (method, seed) is an ordinary run in OUT/runs/METHOD/seedN, so a comparison resumes where it
stopped: finished runs are read back, interrupted ones continue from their checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from neulite.algorithms.registry import METHODS, sections_read
from neulite.config import Config, config_differences, config_to_toml, load_config, setting_for
from neulite.errors import NeuliteError
from neulite.memory import MIB
from neulite.results import ResultsDir, machine
from neulite.simulation import run_experiment


def run_one(
    cfg: Config, method: str, seed: int, out: Path, console: Console, workers: int = 1
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One finished (method, seed) run: read back if done, resumed if interrupted, else started."""
    results = _run_folder(out, method, seed)
    folder = results.path
    if not results.summary_path.is_file():
        run_cfg = _run_config(cfg, method, seed)
        resume = results.checkpoint_path.is_file()
        console.print(f"{'resuming' if resume else 'running'} {method}, seed {seed}")
        run_experiment(
            run_cfg, folder, resume=resume, overwrite=not resume, console=Console(quiet=True), workers=workers
        )
    else:
        console.print(f"done already: {method}, seed {seed}")
    return results.read_summary(), results.read_metrics()


def _run_folder(out: Path, method: str, seed: int) -> ResultsDir:
    return ResultsDir(out / "runs" / method / f"seed{seed}")


def _run_config(cfg: Config, method: str, seed: int) -> Config:
    return cfg.replace(seed=seed, method=dataclasses.replace(cfg.method, name=method))


def _check_finished_runs(cfg: Config, methods: list[str], seeds: list[int], out: Path) -> None:
    """Refuse to read back a finished run whose setting differs, for its method, from this one (a
    change to another method's `[method.SECTION]` keeps it), naming what changed."""
    for method in (m for m in methods if m in METHODS):
        reads = sections_read(method)
        for seed in seeds:
            results = _run_folder(out, method, seed)
            folder = results.path
            if not results.summary_path.is_file():
                continue
            recorded = setting_for(load_config(results.config_path).to_dict(), reads)
            if changed := config_differences(recorded, setting_for(_run_config(cfg, method, seed).to_dict(), reads)):
                raise NeuliteError(
                    f"{folder} finished with another {', '.join(changed)}: remove that folder to run {method}, "
                    f"seed {seed} again in this setting"
                )


def _to_target(rows: list[dict[str, Any]], target: float) -> tuple[int | None, float | None, float | None]:
    """First round whose evaluated accuracy reaches `target`, the wall seconds until then, and the
    clients' critical path until then: each round's slowest client, as if the clients trained in
    parallel (None for runs recorded before rounds reported it)."""
    wall = parallel = 0.0
    for r in rows:
        wall += r["wall_seconds"]
        parallel += r.get("slowest_client_seconds", math.nan)
        if not math.isnan(r["accuracy"]) and r["accuracy"] >= target:
            return r["round"], wall, None if math.isnan(parallel) else parallel
    return None, None, None


UNRECORDED_HOST = "not recorded"
"""The host of a round recorded before rounds named the machine whose clock they are."""


def _hosts(runs: Iterable[list[dict[str, Any]]]) -> list[str]:
    """The machines whose clocks a method's rounds are, each once: its seconds compare with another
    method's only on the same machine. A host that is not text (an edited file) is shown as written."""
    return sorted({str(r.get("host", UNRECORDED_HOST)) for rows in runs for r in rows})


LATE_EVALUATIONS = 10
"""How many of a run's last evaluations `late_accuracy` averages: under a skewed split one round's
accuracy swings by tens of points, so a method's rank by its final round alone is partly luck."""


def late_accuracy(rows: list[dict[str, Any]]) -> float:
    """Mean test accuracy over a run's last `LATE_EVALUATIONS` evaluated rounds."""
    evaluated = [r["accuracy"] for r in rows if not math.isnan(r["accuracy"])]
    return statistics.mean(evaluated[-LATE_EVALUATIONS:])


def _median_or_none(values: list[float | None]) -> float | None:
    """Median over seeds, a seed that never reached the target counting as infinitely slow (None if that is the median)."""
    median = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(median) else median


def compare(
    cfg: Config,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    *,
    target: float | None = None,
    console: Console | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run every method on every seed and write the comparison; returns summary.json's content.

    The target accuracy for "time to target" defaults to ExclusiveFL's median final accuracy
    when ExclusiveFL is among the methods. `workers` > 1 trains each round's clients in that many
    processes (see `Simulation`).
    """
    out = Path(out)
    with ResultsDir(out).hold():  # a second comparison in the folder would race this one run by run
        return _compare(cfg, methods, seeds, out, target, console or Console(quiet=True), workers)


def _compare(
    cfg: Config,
    methods: list[str],
    seeds: list[int],
    out: Path,
    target: float | None,
    console: Console,
    workers: int,
) -> dict[str, Any]:
    shared = out / "config.toml"
    if shared.is_file():
        changed = config_differences(setting_for(load_config(shared).to_dict(), ()), setting_for(cfg.to_dict(), ()))
        if changed:
            raise NeuliteError(
                f"{out} holds a comparison with another {', '.join(changed)} ({shared}); use another --out"
            )
    _check_finished_runs(cfg, methods, seeds, out)
    shared.write_text(config_to_toml(cfg))
    runs: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]] = {}
    skipped: dict[str, str] = {}
    for m in methods:
        try:
            runs[m] = [run_one(cfg, m, s, out, console, workers) for s in seeds]
        except NeuliteError as exc:  # e.g. no client fits this method's model: report it, compare the rest
            skipped[m] = str(exc)
            console.print(f"[yellow]skipping {m}: {exc}[/yellow]")
    if not runs:
        raise NeuliteError(f"no method could run: {'; '.join(f'{m}: {e}' for m, e in skipped.items())}")
    if target is None and "exclusivefl" in runs:
        target = statistics.median(s["final_accuracy"] for s, _ in runs["exclusivefl"])
    table: dict[str, dict[str, Any]] = {}
    for m, seed_runs in runs.items():
        finals = [s["final_accuracy"] for s, _ in seed_runs]
        reached = [_to_target(rows, target) for _, rows in seed_runs] if target is not None else []
        table[m] = {
            "final_accuracy_mean": statistics.mean(finals),
            "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_accuracy_median": statistics.median(finals),
            "late_accuracy_mean": statistics.mean(late_accuracy(rows) for _, rows in seed_runs),
            "best_accuracy": statistics.mean(s["best_accuracy"] for s, _ in seed_runs),
            "validation_accuracy": statistics.mean(s["validation_accuracy"] for s, _ in seed_runs),
            "participation": statistics.mean(s["participation"] for s, _ in seed_runs),
            "peak_memory_bytes": max(s["peak_memory_bytes"] for s, _ in seed_runs),
            "rounds_to_target": _median_or_none([r for r, _, _ in reached]) if reached else None,
            "seconds_to_target": _median_or_none([t for _, t, _ in reached]) if reached else None,
            "client_seconds_to_target": _median_or_none([c for _, _, c in reached]) if reached else None,
            "wall_seconds": statistics.median(s["wall_seconds"] for s, _ in seed_runs),
            "bytes_up": statistics.mean(s["bytes_up"] for s, _ in seed_runs),
            "bytes_down": statistics.mean(s["bytes_down"] for s, _ in seed_runs),
            "seeds": seeds,
            "final_accuracies": finals,
            "hosts": _hosts(rows for _, rows in seed_runs),
        }
    summary = {
        "methods": table,
        "skipped": skipped,
        "target_accuracy": target,
        "machine": machine(),
        "config": cfg.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_tables(table, out, target, skipped)
    _plot(runs, out / "accuracy.png")
    console.print(render(table, target))
    return summary


COLUMNS = [
    ("method", lambda m, r: m),
    ("final acc (mean ± std)", lambda m, r: f"{r['final_accuracy_mean']:.1%} ± {r['final_accuracy_std']:.1%}"),
    ("best acc", lambda m, r: f"{r['best_accuracy']:.1%}"),
    ("clients took part", lambda m, r: f"{r['participation']:.0%}"),
    ("peak client MiB", lambda m, r: f"{r['peak_memory_bytes'] / MIB:.1f}"),
    ("rounds to target", lambda m, r: "-" if r["rounds_to_target"] is None else f"{r['rounds_to_target']:.0f}"),
    ("s to target", lambda m, r: "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}"),
    (
        "client s to target",
        lambda m, r: "-" if r.get("client_seconds_to_target") is None else f"{r['client_seconds_to_target']:.1f}",
    ),
    ("wall s", lambda m, r: f"{r['wall_seconds']:.0f}"),
    ("MiB up / down", lambda m, r: f"{r['bytes_up'] / MIB:.0f} / {r['bytes_down'] / MIB:.0f}"),
]


def render(table: dict[str, dict[str, Any]], target: float | None) -> Table:
    title = "comparison" + ("" if target is None else f" (target accuracy {target:.1%})")
    t = Table(title=title)
    for name, _ in COLUMNS:
        t.add_column(name, justify="left" if name == "method" else "right")
    for m, r in table.items():
        t.add_row(*(fn(m, r) for _, fn in COLUMNS))
    return t


def _write_tables(table: dict[str, dict[str, Any]], out: Path, target: float | None, skipped: dict[str, str]) -> None:
    header = [name for name, _ in COLUMNS]
    rows = [[fn(m, r) for _, fn in COLUMNS] for m, r in table.items()]
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (
        ""
        if target is None
        else f"\nTarget accuracy for rounds/seconds to target: {target:.1%} (median over seeds, a seed that never reached it counting as infinitely slow; '-' = not reached by most seeds).\n"
    )
    note += "".join(f"\nNot run: {m}: {reason}\n" for m, reason in skipped.items())
    (out / "comparison.md").write_text("\n".join(lines) + "\n" + note)


def _plot(runs: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, seed_runs in runs.items():
        by_round: dict[int, list[float]] = {}
        for _, rows in seed_runs:
            for r in rows:
                if not math.isnan(r["accuracy"]):
                    by_round.setdefault(r["round"], []).append(r["accuracy"])
        xs = sorted(by_round)
        # solid NeuLite variants, dashed baselines: 12 methods outnumber the 10 default colours
        ax.plot(
            xs, [statistics.mean(by_round[x]) for x in xs], label=m, linestyle="-" if m.startswith("neulite") else "--"
        )
    ax.set(xlabel="round", ylabel="test accuracy (mean over seeds)", ylim=(0, 1), title="accuracy against rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
