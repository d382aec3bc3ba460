"""One experiment from config to results folder: the rounds, checkpoints and summary.

`RunLog` is the bookkeeping every driver shares (metrics rows, per-round checkpoint, resume,
summary); `run_experiment` is the in-process simulator's loop around it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from neulite.config import Config
from neulite.federation import MB
from neulite.results import ResultsDir
from neulite.server import RoundRecord, Server
from neulite.simulation import Simulation


class RunLog:
    """The results folder of a running experiment: resumes from its checkpoint, logs every round."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool, console: Console) -> None:
        self.cfg, self.console = cfg, console
        self.results = ResultsDir(out)
        self.state = self.results.load_checkpoint() if resume else None
        self.first_round, elapsed = 1, 0.0
        if self.state is not None:
            self.first_round, elapsed = self.state["round"] + 1, self.state["wall_seconds"]
            self.results.rewrite_metrics(self.results.read_metrics(self.state["round"]))
            console.print(f"resuming {out} after round {self.state['round']}")
        else:
            self.results.start(cfg)
        self.rows = self.results.read_metrics()
        self.start = time.perf_counter() - elapsed

    def resume(self, server: Server) -> None:
        """Restore the server from the checkpoint, if this run resumes one."""
        if self.state is not None:
            server.load_state_dict(self.state["simulation"])

    def record(self, record: RoundRecord, server: Server) -> None:
        """Append the round's metrics and replace the checkpoint (atomically)."""
        row = record.as_dict()
        self.rows.append(row)
        self.results.append_metrics(row)
        self.results.save_checkpoint({"round": record.round, "wall_seconds": time.perf_counter() - self.start, "simulation": server.state_dict()})
        if not self.console.is_terminal:  # a log file gets one line per round instead of progress bars
            stage = "full model" if record.stage == 0 else f"stage {record.stage}"
            self.console.print(
                f"round {record.round}/{self.cfg.method.rounds} {stage}: {record.participants}/{record.eligible} eligible clients trained, "
                f"test accuracy {record.accuracy:.3f}, {record.wall_seconds:.1f} s",
                soft_wrap=True,
            )

    def finish(self, server: Server, final: tuple[float, float], validation_accuracy: float, **extra: Any) -> dict[str, Any]:
        """Write the model, metrics table, plots and summary.json; returns the summary."""
        rows, method = self.rows, server.method
        budgets = server.budgets.values()
        accuracy, loss = final
        mem = server.memory_rows()
        summary = {
            "method": self.cfg.method.name,
            "final_accuracy": accuracy,
            "final_loss": loss,
            "validation_accuracy": validation_accuracy,
            "best_accuracy": max((r["accuracy"] for r in rows if r["accuracy"] == r["accuracy"]), default=accuracy),
            "rounds": self.cfg.method.rounds,
            "wall_seconds": time.perf_counter() - self.start,
            "num_clients": len(budgets),
            "participation": len(server.participated) / len(budgets),
            "full_model_clients": sum(b >= server.full_peak for b in budgets) / len(budgets),
            "peak_memory_bytes": max(method.memory(p).total for p in method.plans()),
            "full_model_peak_bytes": server.full_peak,
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "stages": mem,
            "lambda1": list(getattr(method, "lambda1", ())),
            "lambda2": list(getattr(method, "lambda2", ())),
            **extra,
        }
        self.results.finish(rows, method.final_model(), summary, mem)
        self.console.print(summary_table(summary))
        return summary


def run_experiment(cfg: Config, out: str | Path, *, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run (or, with `resume`, continue from its checkpoint) an experiment; returns the summary."""
    console = console or Console(quiet=True)
    run = RunLog(cfg, out, resume=resume, console=console)
    sim = Simulation(cfg)
    run.resume(sim.server)
    rounds = cfg.method.rounds
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as progress:
        round_bar = progress.add_task("rounds", total=rounds, completed=run.first_round - 1)
        client_bar = progress.add_task("clients", total=cfg.clients.per_round)
        for rnd in range(run.first_round, rounds + 1):
            plan = sim.method.plan(rnd)
            stage = "full model" if plan.full else f"stage {plan.stage}/{plan.num_stages}"
            progress.update(round_bar, description=f"round {rnd} ({stage})")
            progress.reset(client_bar, total=min(cfg.clients.per_round, len(sim.eligible(plan))))
            run.record(sim.run_round(rnd, on_client=lambda: progress.advance(client_bar)), sim.server)
            progress.advance(round_bar)
    return run.finish(sim.server, sim.final_accuracy(), sim.validation_accuracy())


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
