"""The results folder and the run bookkeeping every driver shares: resolved config, per-round
metrics, checkpoints, the final model, plots, summary.

Written as the run goes (metrics appended and a checkpoint replaced atomically every round), so a
crash loses at most the round in flight and `neulite run --resume DIR` carries on from there.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from neulite.config import Config, config_differences, config_to_toml, load_config
from neulite.errors import NeuliteError
from neulite.memory import MIB
from neulite.models.stage_net import FULL_MODEL
from neulite.server import RoundRecord, Server


def _first_line(exc: BaseException) -> str:
    """An exception's message reduced to one line (its type when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_failure(exc: BaseException) -> str:
    """Why `torch.load(..., weights_only=True)` refused a file, in one line. torch's own message
    for a file its safe loader refuses opens by suggesting `weights_only=False`, which would run
    whatever code a crafted file holds: only its reason is kept."""
    text = str(exc)
    if not text.startswith("Weights only load failed"):
        return _first_line(exc)
    reasons = [p.strip() for p in text.split("\n\n")[1:] if p.strip() and not p.startswith("Check the documentation")]
    return "the safe loader (weights_only=True) refused it: " + (
        reasons[-1].replace("\n", " ") if reasons else "no reason given"
    )


def _json(path: Path, text: str, where: str = "") -> Any:
    """`text` (from `path`) parsed as JSON, or an error that names the file (and `where` in it)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise NeuliteError(
            f"corrupted results file {path}{where}: {exc.msg} (remove the run folder to run it again)"
        ) from None


class ResultsDir:
    """One experiment's folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoint.pt", "summary.json", "model.pt")

    def check_target(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse a folder a run cannot write to, and a finished or started run's folder unless
        the user asked to continue it (`resume`) or to replace it (`overwrite`)."""
        self._refuse_a_file()
        if resume and overwrite:
            raise NeuliteError("--resume and --overwrite exclude each other")
        held = [name for name in self.RUN_FILES if (self.path / name).exists()]
        if held and not (resume or overwrite):
            raise NeuliteError(
                f"{self.path} already holds a run ({', '.join(held)}): pass --resume to continue it "
                "or --overwrite to replace it"
            )

    def _refuse_a_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise NeuliteError(f"--out {self.path} is a file, not a results folder")

    def hold(self) -> FolderHold:
        """This process's exclusive hold on the folder, created if need be, until released (or the
        process ends, crash or not: the OS drops it, so no stale lock outlives a run). Two processes
        writing one folder (a run launched twice, two `--resume`s of one) would interleave metrics
        and replace each other's checkpoint; the second is refused instead."""
        self._refuse_a_file()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise NeuliteError(f"cannot write results to {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NeuliteError(
                f"{self.path} is in use: another neulite process is writing a run or comparison there "
                "(wait for it to end, or choose another --out)"
            ) from None
        return FolderHold(fd)

    def start(self, cfg: Config) -> None:
        """A fresh run in the held folder (`hold` made it): the resolved config, empty metrics, and
        nothing left of a replaced run."""
        for name in self.RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        self.config_path.write_text(config_to_toml(cfg))
        self.metrics_path.write_text("")

    def load_config(self, overrides: list[str] | None = None) -> Config:
        """The run's config, with `--set` overrides (which resume then checks against the checkpoint)."""
        if not self.config_path.is_file():
            raise NeuliteError(f"cannot resume: {self.config_path} not found")
        return load_config(self.config_path, overrides)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self, up_to_round: int | None = None) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        text = self.metrics_path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()  # a row cut short by a crash mid-write: its round never reached a checkpoint
        rows = [_json(self.metrics_path, line, f", line {n}") for n, line in enumerate(lines, 1) if line.strip()]
        return [r for r in rows if up_to_round is None or r["round"] <= up_to_round]

    def read_summary(self) -> dict[str, Any]:
        return _json(self.summary_path, self.summary_path.read_text())

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace the checkpoint by a whole new one or not at all: written aside, on disk (fsync:
        a power cut must not leave the new name on unwritten data), then renamed over the old."""
        tmp = self.checkpoint_path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as f:  # a file object: torch then reports a full disk as the OSError it is
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_path)
        finally:
            tmp.unlink(missing_ok=True)  # what a failed write left: on a full disk, the space it took

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        # torch warns as it reads a file it then refuses (a plain pickle's protocol): the one-line
        # error says all of it, so the warnings are kept only for a file it loads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:  # tensors and plain values only: a crafted checkpoint cannot run code
                state = torch.load(self.checkpoint_path, weights_only=True)
            except Exception as exc:
                raise NeuliteError(
                    f"corrupted or unsafe checkpoint {self.checkpoint_path}: {_load_failure(exc)}"
                ) from None
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        keys = {"round", "wall_seconds", "simulation", "config"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise NeuliteError(
                f"corrupted checkpoint {self.checkpoint_path}: it lacks one of {', '.join(sorted(keys))}"
            )
        return state

    def finish(
        self,
        rows: list[dict[str, Any]],
        model: torch.nn.Module,
        summary: dict[str, Any],
        memory_rows: list[dict[str, Any]],
    ) -> None:
        with (self.path / "model.pt").open("wb") as f:
            torch.save(model.state_dict(), f)
        if rows:
            with (self.path / "metrics.csv").open("w", newline="") as f:
                fields = dict.fromkeys(key for row in rows for key in row)  # a resumed run's older rows may lack some
                writer = csv.DictWriter(f, fieldnames=list(fields))
                writer.writeheader()
                writer.writerows(rows)
        self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        plot_accuracy(rows, self.path / "accuracy.png")
        plot_memory(memory_rows, self.path / "memory.png")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy of the round's stage model, with the stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["round"], r["accuracy"]) for r in rows if not math.isnan(r["accuracy"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.plot(*zip(*points, strict=True), marker=".", label="stage model")
    for prev, cur in zip(rows, rows[1:], strict=False):
        if cur["stage"] != prev["stage"]:
            ax.axvline(cur["round"] - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="accuracy per round (dotted: stage change)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(memory_rows: list[dict[str, Any]], path: Path) -> None:
    """Estimated training peak of each stage against full-model training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in memory_rows]
    values = [r["estimated_bytes"] / MIB for r in memory_rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, values, color=["tab:red" if r["label"] == "full" else "tab:blue" for r in memory_rows])
    ax.set(ylabel="peak training memory (MiB)", title="peak memory per stage vs full-model training")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class FolderHold:
    """A held results folder (`ResultsDir.hold`); a context manager that releases it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops its lock
            self._fd = -1

    def __enter__(self) -> FolderHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLog:
    """The results folder of a running experiment: resumes from its checkpoint, logs every round.
    It holds the folder (`ResultsDir.hold`) until closed; use it as a context manager. `host`, when
    the clients' seconds are this machine's clock (the in-process simulator), goes into every round's
    row: a run resumed elsewhere, or runs compared from several machines, show whose clock each is."""

    def __init__(
        self,
        cfg: Config,
        out: str | Path,
        *,
        resume: bool,
        console: Console,
        overwrite: bool = False,
        host: str | None = None,
    ) -> None:
        self.cfg, self.console, self.host = cfg, console, host
        self.folder = ResultsDir(out)
        self.hold = self.folder.hold()
        try:
            self._open(resume, overwrite)
        except BaseException:
            self.hold.release()
            raise

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hold.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A results file that cannot be written (a full disk, a folder removed or made read-only)
        stops the run by name; the checkpoint is only ever replaced whole, so the last one holds."""
        try:
            yield
        except OSError as exc:
            raise NeuliteError(
                f"cannot write {exc.filename or self.folder.path}: {exc.strerror or exc}; the run stops "
                "(its last checkpoint stays whole: once that is fixed, --resume continues from it)"
            ) from None

    def _open(self, resume: bool, overwrite: bool) -> None:
        out = self.folder.path
        self.folder.check_target(resume=resume, overwrite=overwrite)
        self.state = self.folder.load_checkpoint() if resume else None
        self.first_round, elapsed = 1, 0.0
        if self.state is not None:
            if changed := config_differences(self.state["config"], self.cfg.to_dict()):
                raise NeuliteError(
                    f"cannot resume {out}: the config differs from the checkpoint's in {', '.join(changed)} "
                    "(a run resumes only on the config it started with; start a new run to change it)"
                )
            self.first_round, elapsed = self.state["round"] + 1, self.state["wall_seconds"]
            self.rows = self.folder.read_metrics(self.state["round"])
            with self._writing():
                self.folder.rewrite_metrics(self.rows)
            self.console.print(f"resuming {out} after round {self.state['round']}")
        else:
            with self._writing():
                self.folder.start(self.cfg)
            self.rows = []
        self.start = time.perf_counter() - elapsed

    def resume(self, server: Server) -> None:
        """Restore the server from the checkpoint, if this run resumes one."""
        if self.state is not None:
            try:
                server.load_state_dict(self.state["simulation"])
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
                raise NeuliteError(
                    f"corrupted checkpoint {self.folder.checkpoint_path}: it does not fit this run ({_first_line(exc)})"
                ) from None

    def record(self, record: RoundRecord, server: Server) -> None:
        """Append the round's metrics and replace the checkpoint (atomically)."""
        row = record.as_dict() | ({"host": self.host} if self.host else {})
        self.rows.append(row)
        with self._writing():
            self.folder.append_metrics(row)
            self.folder.save_checkpoint(
                {
                    "round": record.round,
                    "wall_seconds": time.perf_counter() - self.start,
                    "simulation": server.state_dict(),
                    "config": self.cfg.to_dict(),
                }
            )
        if not self.console.is_terminal:  # a log file gets one line per round instead of progress bars
            stage = "full model" if record.stage == FULL_MODEL else f"stage {record.stage}"
            self.console.print(
                f"round {record.round}/{self.cfg.method.rounds} {stage}: {record.participants}/{record.eligible} eligible clients trained"
                + (f" ({record.recomputing} recomputing)" if record.recomputing else "")
                + f", test accuracy {record.accuracy:.3f}, {record.wall_seconds:.1f} s",
                soft_wrap=True,
            )

    def finish(
        self, server: Server, final: tuple[float, float], validation_accuracy: float, **extra: Any
    ) -> dict[str, Any]:
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
            "peak_memory_bytes": max(method.memory(plan).total for plan in method.trained_plans()),
            "full_model_peak_bytes": server.full_peak,
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "stages": mem,
            **method.summary(),
            **extra,
        }
        with self._writing():
            self.folder.finish(rows, method.final_model(), summary, mem)
        self.console.print(summary_table(summary))
        return summary


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"neulite run: {summary['method']}", show_header=False)
    table.add_row("final test accuracy (full model)", f"{summary['final_accuracy']:.2%}")
    table.add_row("rounds / wall time", f"{summary['rounds']} / {summary['wall_seconds']:.0f} s")
    table.add_row("clients that took part", f"{summary['participation']:.0%} of {summary['num_clients']}")
    table.add_row("clients that fit full-model training", f"{summary['full_model_clients']:.0%}")
    for row in summary["stages"]:
        table.add_row(
            f"peak memory, {row['label']}",
            f"{row['estimated_bytes'] / MIB:.1f} MiB ({row['clients_fit']} {'client fits' if row['clients_fit'] == 1 else 'clients fit'})",
        )
    table.add_row("bytes down / up", f"{summary['bytes_down'] / MIB:.1f} / {summary['bytes_up'] / MIB:.1f} MiB")
    return table
