"""The Flower ServerApp: profile the nodes, run the strategy, write the same results folder as
`neulite run` (metrics, per-round checkpoint, summary.json, plots)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from neulite.algorithms.registry import build_method
from neulite.errors import NeuliteError
from neulite.federation import load_splits
from neulite.flower.run_config import parse_run_config
from neulite.flower.strategy import NeuliteStrategy, profile_nodes
from neulite.memory import estimate
from neulite.runner import RunLog
from neulite.server import Server

log = logging.getLogger(__name__)


def make_server_app(run_config: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is `run_config` overridden by Flower's (for `run_simulation`,
    which passes none)."""
    app = ServerApp()
    base = dict(run_config or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run(grid, {**base, **context.run_config})
        except NeuliteError as exc:
            log.error("neulite: error: %s", exc)
            raise

    return app


def run(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """The whole experiment on `grid`; returns the summary."""
    cfg, driver = parse_run_config(run_config)
    torch.manual_seed(cfg.seed)
    splits = load_splits(cfg)
    net, method = build_method(cfg, splits.input_shape, splits.train.num_classes)
    if method.setup_needs_clients:
        raise NeuliteError(f"{cfg.method.name} needs every client's data or budget at set-up; run it with `neulite run`")
    full_peak = estimate(net, net.plan(0), cfg.train.batch_size).total
    min_nodes = driver.min_nodes or cfg.data.num_clients
    found = profile_nodes(grid, full_peak, min_nodes=min_nodes, wait=driver.node_wait)
    server = Server(method, {cid: budget for cid, (_, budget) in found.items()}, cfg, full_peak)
    server.check_feasible()
    console = Console(force_terminal=False, soft_wrap=True)
    results = RunLog(cfg, driver.out, resume=driver.resume, console=console)
    results.resume(server)
    strategy = NeuliteStrategy(server, {cid: node for cid, (node, _) in found.items()}, splits.test, results.record, results.first_round)
    strategy.start(grid, ArrayRecord(), num_rounds=cfg.method.rounds - results.first_round + 1, timeout=driver.round_timeout)
    final = method.evaluate(method.final_plan(), splits.test)
    return results.finish(server, final, strategy.validation_accuracy, driver="flower", nodes=len(found))


app = make_server_app()
