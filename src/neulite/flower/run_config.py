"""Flower's run config (flat `key = value`, from pyproject's [tool.flwr.app.config] and
`--run-config`) mapped to a neulite `Config` plus the driver's own settings.

Keys whose first part names a config section (`method.rounds`, `data.num_clients`, `seed`, ...)
override the experiment config, exactly like `neulite run --set`; lists are written as strings
("[0.3, 1.1]"). The other keys are the driver's, listed in `DriverSettings`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from neulite.config import Config, load_config
from neulite.errors import NeuliteError

EXPERIMENT_KEYS = {f.name for f in dataclasses.fields(Config)}


@dataclass(frozen=True)
class DriverSettings:
    """The Flower driver's own keys.

    config-file : str (default "")   neulite TOML config the overrides apply to ("" = built-in defaults)
    out : str (default "results/flower")   results folder written by the ServerApp
    resume : bool (default false)   continue the run in `out` from its last checkpoint
    overwrite : bool (default false)   replace the run already in `out` (without it or `resume`, such a folder is refused)
    round-timeout : float (default 600)   seconds to wait for a round's replies
    node-wait : float (default 120)   seconds to wait for enough nodes to connect, and for their profiling answers
    min-nodes : int (default 0)   nodes that must answer the profiling query (0 = data.num_clients)
    """

    config_file: str = ""
    out: str = "results/flower"
    resume: bool = False
    overwrite: bool = False
    round_timeout: float = 600.0
    node_wait: float = 120.0
    min_nodes: int = 0


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def parse_run_config(run_config: dict[str, Any]) -> tuple[Config, DriverSettings]:
    """The experiment config and the driver settings; unknown keys fail naming the key."""
    overrides, settings = [], {}
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(DriverSettings)}
    for key, value in run_config.items():
        if key.split(".")[0] in EXPERIMENT_KEYS:
            overrides.append(f"{key}={_text(value)}")
        elif key in fields:
            kind = fields[key].type
            if kind == "bool" and not isinstance(value, bool):
                raise NeuliteError(f"bad run config: {key} must be true or false, got {value!r}")
            settings[fields[key].name] = value
        else:
            raise NeuliteError(
                f"bad run config: unknown key {key!r} (neulite config keys like method.rounds, or {', '.join(sorted(fields))})"
            )
    driver = DriverSettings(**settings)
    cfg = load_config(driver.config_file or None, overrides)
    if cfg.clients.enforce_budgets:
        raise NeuliteError(
            "clients.enforce_budgets holds the in-process simulator's clients to their budgets; on Flower a node's"
            ' limit is its device\'s: start each SuperNode under one (docs/flower.md) with clients.budget = "measured"'
        )
    return cfg, driver
