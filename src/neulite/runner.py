"""One experiment from config to results folder: the simulator's rounds, checkpoints and summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from neulite.config import Config
from neulite.federation import MB
from neulite.results import ResultsDir
from neulite.simulation import Simulation


def memory_rows(sim: Simulation) -> list[dict[str, Any]]:
    """Estimated peak per stage this method trains, and full-model training for reference."""
    rows = []
    for plan in sim.method.plans():
        label = "full" if plan.full else f"stage {plan.stage}"
        fits = sum(c.budget >= sim.method.memory(plan).total for c in sim.clients)
        rows.append({"label": label, "stage": plan.stage, "estimated_bytes": sim.method.memory(plan).total, "clients_fit": fits})
    if not any(r["label"] == "full" for r in rows):
        fits = sum(c.budget >= sim.full_peak for c in sim.clients)
        rows.append({"label": "full", "stage": 0, "estimated_bytes": sim.full_peak, "clients_fit": fits})
    return rows


def run_experiment(cfg: Config, out: str | Path, *, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run (or, with `resume`, continue from its checkpoint) an experiment; returns the summary."""
    console = console or Console(quiet=True)
    results = ResultsDir(out)
    sim = Simulation(cfg)
    first_round, elapsed = 1, 0.0
    state = results.load_checkpoint() if resume else None
    if state is not None:
        sim.load_state_dict(state["simulation"])
        first_round, elapsed = state["round"] + 1, state["wall_seconds"]
        results.rewrite_metrics(results.read_metrics(state["round"]))
        console.print(f"resuming {out} after round {state['round']}")
    else:
        results.start(cfg)
    rows = results.read_metrics()
    rounds = cfg.method.rounds
    start = time.perf_counter() - elapsed
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as progress:
        round_bar = progress.add_task("rounds", total=rounds, completed=first_round - 1)
        client_bar = progress.add_task("clients", total=cfg.clients.per_round)
        for rnd in range(first_round, rounds + 1):
            plan = sim.method.plan(rnd)
            stage = "full model" if plan.full else f"stage {plan.stage}/{plan.num_stages}"
            progress.update(round_bar, description=f"round {rnd} ({stage})")
            progress.reset(client_bar, total=min(cfg.clients.per_round, len(sim.eligible(plan))))
            record = sim.run_round(rnd, on_client=lambda: progress.advance(client_bar))
            row = record.as_dict()
            rows.append(row)
            results.append_metrics(row)
            results.save_checkpoint({"round": rnd, "wall_seconds": time.perf_counter() - start, "simulation": sim.state_dict()})
            progress.advance(round_bar)
            if not console.is_terminal:  # a log file gets one line per round instead of bars
                console.print(
                    f"round {rnd}/{rounds} {stage}: {record.participants}/{record.eligible} eligible clients trained, "
                    f"test accuracy {record.accuracy:.3f}, {record.wall_seconds:.1f} s",
                    soft_wrap=True,
                )
    accuracy, loss = sim.final_accuracy()
    wall = time.perf_counter() - start
    mem = memory_rows(sim)
    summary = {
        "method": cfg.method.name,
        "final_accuracy": accuracy,
        "final_loss": loss,
        "validation_accuracy": sim.validation_accuracy(),
        "best_accuracy": max((r["accuracy"] for r in rows if r["accuracy"] == r["accuracy"]), default=accuracy),
        "rounds": rounds,
        "wall_seconds": wall,
        "num_clients": len(sim.clients),
        "participation": len(sim.participated) / len(sim.clients),
        "full_model_clients": sum(c.budget >= sim.full_peak for c in sim.clients) / len(sim.clients),
        "peak_memory_bytes": max(sim.method.memory(p).total for p in sim.method.plans()),
        "full_model_peak_bytes": sim.full_peak,
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "stages": mem,
        "lambda1": list(getattr(sim.method, "lambda1", ())),
        "lambda2": list(getattr(sim.method, "lambda2", ())),
    }
    results.finish(rows, sim.method.final_model(), summary, mem)
    console.print(summary_table(summary))
    return summary


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"neulite run: {summary['method']}", show_header=False)
    table.add_row("final test accuracy (full model)", f"{summary['final_accuracy']:.2%}")
    table.add_row("rounds / wall time", f"{summary['rounds']} / {summary['wall_seconds']:.0f} s")
    table.add_row("clients that took part", f"{summary['participation']:.0%} of {summary['num_clients']}")
    table.add_row("clients that fit full-model training", f"{summary['full_model_clients']:.0%}")
    for row in summary["stages"]:
        table.add_row(f"peak memory, {row['label']}", f"{row['estimated_bytes'] / MB:.1f} MiB ({row['clients_fit']} clients fit)")
    table.add_row("bytes down / up", f"{summary['bytes_down'] / MB:.1f} / {summary['bytes_up'] / MB:.1f} MiB")
    return table
