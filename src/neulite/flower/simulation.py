"""Flower's simulation engine on one machine: `neulite run --engine flower`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from neulite.config import Config, config_to_toml
from neulite.data.datasets import DATASET_NAMES
from neulite.errors import NeuliteError
from neulite.flower.client_app import make_client_app
from neulite.flower.server_app import make_server_app
from neulite.importing import is_import_path
from neulite.models.zoo import MODEL_NAMES
from neulite.results import ResultsDir

SIMULATION_NODE_WAIT = 600.0
"""Seconds the simulation engine's ServerApp waits for its nodes' profiling answers."""


def check_portable(cfg: Config) -> None:
    """Every node builds the model and loads its data from the config alone, in its own process,
    where a name registered in this process does not exist."""
    for key, name, built_in in (
        ("model.name", cfg.model.name, MODEL_NAMES),
        ("data.name", cfg.data.name, DATASET_NAMES),
    ):
        if name not in built_in and not is_import_path(name):
            raise NeuliteError(
                f"{key} = {name!r} is registered in this process only, but Flower's nodes build from the config "
                "in their own processes: name it by import path instead ('module:function')"
            )


def run_config_for(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The Flower run config that runs `cfg` into `out`: the config as a TOML file in `out`."""
    check_portable(cfg)
    ResultsDir(out).check_target(resume=resume, overwrite=overwrite)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "flower-config.toml"
    config_file.write_text(config_to_toml(cfg))
    return {"config-file": str(config_file), "out": str(out), "resume": resume, "overwrite": overwrite}


def simulate(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    num_cpus_per_node: float = 1.0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `cfg` on Flower's Ray simulation engine with one supernode per client; returns the summary.

    The config travels as a TOML file named in the run config (what `flwr run` would pass), so the
    ServerApp and every ClientApp parse exactly the config `neulite run` would use.
    """
    from flwr.simulation import run_simulation

    # a node answers the profiling query once its Ray actor has started: on a busy machine that
    # alone has taken two minutes, past the deployment default
    run_config = {**run_config_for(cfg, out, resume=resume, overwrite=overwrite), "node-wait": SIMULATION_NODE_WAIT}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts its workers at nice 15, as background work; here they are the run itself, and on
    # a busy machine nice 15 slowed the whole run eightfold
    os.environ.setdefault("RAY_worker_niceness", "0")
    run_simulation(
        make_server_app(run_config),
        make_client_app(run_config),
        num_supernodes=cfg.data.num_clients,
        backend_config={
            "client_resources": {"num_cpus": num_cpus_per_node, "num_gpus": 0.0},
            # a Ray instance of its own: one found through RAY_ADDRESS or `ray start` may have no CPU
            # free for this run's actors, which then wait for one without a word
            "init_args": {"address": "local"},
        },
        verbose_logging=verbose,
    )
    summary = Path(out) / "summary.json"
    if not summary.is_file():
        raise NeuliteError(f"the Flower simulation wrote no {summary}: see the log above")
    return json.loads(summary.read_text())
