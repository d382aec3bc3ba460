"""The results folder: resolved config, per-round metrics, checkpoints, the final model, plots, summary.

Written as the run goes (metrics appended and a checkpoint replaced atomically every round), so a
crash loses at most the round in flight and `neulite run --resume DIR` carries on from there.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from neulite.config import Config, load_config
from neulite.errors import NeuliteError


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def config_to_toml(cfg: Config) -> str:
    lines, tables = [], []
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in value.items()))
        else:
            lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines) + "".join(tables)


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

    def start(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_to_toml(cfg))
        self.metrics_path.write_text("")

    def load_config(self) -> Config:
        if not self.config_path.is_file():
            raise NeuliteError(f"cannot resume: {self.config_path} not found")
        return load_config(self.config_path)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self, up_to_round: int | None = None) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        return [r for r in rows if up_to_round is None or r["round"] <= up_to_round]

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        try:
            state = torch.load(self.checkpoint_path, weights_only=False)
        except Exception as exc:
            raise NeuliteError(f"corrupted checkpoint {self.checkpoint_path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(state, dict) or not {"round", "simulation"} <= state.keys():
            raise NeuliteError(f"corrupted checkpoint {self.checkpoint_path}: missing 'round' or 'simulation'")
        return state

    def finish(self, rows: list[dict[str, Any]], model: torch.nn.Module, summary: dict[str, Any], memory_rows: list[dict[str, Any]]) -> None:
        torch.save(model.state_dict(), self.path / "model.pt")
        if rows:
            with (self.path / "metrics.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_accuracy(rows, self.path / "accuracy.png")
        plot_memory(memory_rows, self.path / "memory.png")


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy of the round's stage model, with the stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["round"], r["accuracy"]) for r in rows if not math.isnan(r["accuracy"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.plot(*zip(*points), marker=".", label="stage model")
    for prev, cur in zip(rows, rows[1:]):
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
    values = [r["estimated_bytes"] / 2**20 for r in memory_rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, values, color=["tab:red" if r["label"] == "full" else "tab:blue" for r in memory_rows])
    ax.set(ylabel="peak training memory (MiB)", title="peak memory per stage vs full-model training")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
