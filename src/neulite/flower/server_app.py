"""The Flower ServerApp: profile the nodes, run the strategy, write the same results folder as
`neulite run` (metrics, per-round checkpoint, summary.json, plots)."""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from neulite.errors import NeuliteError
from neulite.experiment import Experiment, build_experiment
from neulite.federation import simulated_budgets
from neulite.flower.grid import PromptGrid
from neulite.flower.run_config import parse_run_config
from neulite.flower.strategy import NeuliteStrategy, NodeQuery, profile_nodes
from neulite.memory import MIB
from neulite.results import RunLog

log = logging.getLogger(__name__)


def make_server_app(run_config: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is `run_config` overridden by Flower's (for `run_simulation`,
    which passes none)."""
    app = ServerApp()
    base = dict(run_config or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run(PromptGrid(grid), {**base, **context.run_config})
        except NeuliteError as exc:
            log.error("neulite: error: %s", exc)
            raise

    return app


def run(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """The whole experiment on `grid`; returns the summary."""
    cfg, driver = parse_run_config(run_config)
    experiment = build_experiment(cfg)
    min_nodes = driver.min_nodes or cfg.data.num_clients
    found = profile_nodes(
        grid, experiment.full_peak, partitions=cfg.data.num_clients, min_nodes=min_nodes, wait=driver.node_wait
    )
    budgets = {cid: profile.budget for cid, profile in found.items()}
    check_planned_budgets(experiment, budgets)
    nodes = {cid: profile.node for cid, profile in found.items()}
    query = NodeQuery(grid, nodes, experiment.method, timeout=driver.round_timeout)
    server = experiment.server(budgets, query)
    console = Console(force_terminal=False, soft_wrap=True)
    with RunLog(cfg, driver.out, resume=driver.resume, overwrite=driver.overwrite, console=console) as run_log:
        run_log.resume(server)
        strategy = NeuliteStrategy(server, nodes, experiment.splits.test, run_log.record, run_log.first_round)
        strategy.start(
            grid, ArrayRecord(), num_rounds=cfg.method.rounds - run_log.first_round + 1, timeout=driver.round_timeout
        )
        final = server.evaluate(experiment.method.final_plan(), experiment.splits.test)
        return run_log.finish(
            server,
            final,
            strategy.validation_accuracy,
            driver="flower",
            nodes=len(found),
            node_budgets={str(cid): {"budget_bytes": p.budget, "source": p.source} for cid, p in found.items()},
            **experiment.summary(),
        )


def check_planned_budgets(experiment: Experiment, reported: dict[int, int]) -> None:
    """`model.blocks = "auto"` plans from the simulated budgets, which every node computes from the
    config alone and so builds the same network; nodes that report budgets of their own need a
    number of blocks planned for those."""
    if experiment.block_plan is None:
        return
    simulated = simulated_budgets(experiment.cfg, experiment.full_peak)
    if any(budget != simulated[cid] for cid, budget in reported.items()):
        cfg = experiment.cfg
        mib = ",".join(f"{reported[cid] / MIB:.1f}" for cid in sorted(reported))
        raise NeuliteError(
            'model.blocks = "auto" plans from the simulated budgets (clients.budget), but these nodes report '
            f"their own: plan for them with `neulite plan --model {cfg.model.name} --width {cfg.model.width} "
            f"--batch-size {cfg.train.batch_size} --target {cfg.model.plan_share} --budgets {mib}` and set "
            "model.blocks to the number it chooses"
        )


app = make_server_app()
