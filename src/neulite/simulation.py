"""The in-process driver: a federation of simulated clients around one `Server`, round by round.

The server decides who trains what; this driver hands each sampled client its `ClientTask`, runs
the method's client update on that client's own data and gives the replies back. Flower's driver
makes the same calls over the network. `run_experiment` is the whole run: rounds, progress,
results folder.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.client_pool import ClientPool
from neulite.config import Config
from neulite.errors import NeuliteError
from neulite.experiment import build_experiment
from neulite.federation import augment_enabled, make_clients, train_on_device
from neulite.prefix_cache import PrefixStore
from neulite.results import ResultsDir, RunLog
from neulite.server import RoundRecord

log = logging.getLogger(__name__)


class Simulation:
    """Clients, data and server for one config; `run_round` advances the experiment by one round.

    `workers` > 1 trains a round's clients side by side in that many processes (`ClientPool`),
    one torch thread each: the same replies as one worker on one thread, bit for bit. Call
    `close` (or use `with`) to stop them.
    """

    def __init__(self, cfg: Config, workers: int = 1) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise NeuliteError(f"workers must be a positive integer, got {workers!r}")
        self.cfg = cfg
        experiment = build_experiment(cfg)
        self.splits, self.method = experiment.splits, experiment.method
        self.clients = make_clients(cfg, self.splits, experiment.indices, experiment.full_peak)
        self.augment = augment_enabled(cfg, self.splits)
        self.prefixes = PrefixStore(cfg.train.prefix_cache_mb)
        self.server = experiment.server({c.cid: c.budget for c in self.clients}, self.query)
        self.setup = experiment.summary()
        self.node_cfg = experiment.cfg  # what a process serving clients builds them from
        self.pool = ClientPool(experiment.cfg, workers) if workers > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, task: ClientTask) -> Mapping[int, ClientResult]:
        """Every client's calibration reply for `task` (see `Server.query`)."""
        return {c.cid: self.method.client_calibrate(task, c.train) for c in self.clients}

    def train(self, cid: int, task: ClientTask) -> ClientResult:
        """One client's reply to its task (replaced on an instance to stand in for a faulty or hostile client)."""
        if self.cfg.clients.enforce_budgets:
            return train_on_device(self.node_cfg, cid, task, self.clients[cid].budget)
        return self.method.client_update(
            task, self.clients[cid].train, augment=self.augment, cache=self.prefixes.get(cid)
        )

    def run_round(self, rnd: int, on_client: Callable[[], None] | None = None) -> RoundRecord:
        """Every sampled client trains; a client that fails is left out and logged, as a node that
        fails is on Flower, and the server checks every reply before merging (`Server.accept`)."""
        configured = self.server.configure(rnd)
        results: dict[int, ClientResult] = {}

        def done(cid: int, result: ClientResult | None, error: str) -> None:
            if result is None:
                log.warning("round %d: client %d left out: it failed: %s", rnd, cid, error)
            else:
                results[cid] = result
            if on_client is not None:
                on_client()

        if self.pool is not None:
            self.pool.train({cid: (task, self.clients[cid].budget) for cid, task in configured.tasks.items()}, done)
        else:
            for cid, task in configured.tasks.items():
                try:
                    result = self.train(cid, task)
                except Exception as exc:  # a client's failure is its own: the round goes on from the others
                    done(cid, None, f"{type(exc).__name__}: {exc}")
                else:
                    done(cid, result, "")
        in_task_order = {
            cid: results[cid] for cid in configured.tasks if cid in results
        }  # the same sums whoever finished first
        return self.server.aggregate(configured, in_task_order, self.splits.test)

    def final_accuracy(self) -> tuple[float, float]:
        """(accuracy, loss) of the deployable model on the global test set."""
        return self.server.evaluate(self.method.final_plan(), self.splits.test)

    def validation_accuracy(self) -> float:
        """Accuracy of the deployable model on the validation splits of the clients that fit some
        stage (for tuning; Flower asks the same nodes, each for its own). The model is the same for
        every client, so unless a prediction depends on its batch (`batch_dependent_evaluation`),
        one pass over their union gives the same figure as one per client, at a cost that does not
        grow with the number of clients."""
        task, fitting = self.method.evaluation_task(), self.server.fitting_clients()
        if self.method.batch_dependent_evaluation:
            vals = [self.clients[cid].val for cid in fitting]
        else:
            vals = [self.splits.train.take(np.concatenate([self.clients[cid].val_indices for cid in fitting]))]
        vals = [val for val in vals if len(val)]
        if not vals:
            return float("nan")
        correct = sum(self.method.client_evaluate(task, val)[0] * len(val) for val in vals)
        return correct / sum(len(val) for val in vals)


def run_experiment(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run an experiment into `out`; returns the summary.

    `resume` continues the run in `out` from its checkpoint (on the same config), `overwrite`
    replaces it; without either, a folder that holds a run is refused. `workers` > 1 trains each
    round's clients in that many processes (see `Simulation`).
    """
    console = console or Console(quiet=True)
    ResultsDir(out).check_target(resume=resume, overwrite=overwrite)
    building = "data, budgets, memory estimates" + (", the block plan" if cfg.model.blocks == "auto" else "")
    with console.status(f"building the federation: {building}"):  # a large network's estimates take minutes
        sim = Simulation(cfg, workers)
    # everything is built and checked before the results folder is touched
    with sim, RunLog(cfg, out, resume=resume, overwrite=overwrite, console=console, host=platform.platform()) as run:
        run.resume(sim.server)
        rounds = cfg.method.rounds
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            round_bar = progress.add_task("rounds", total=rounds, completed=run.first_round - 1)
            client_bar = progress.add_task("clients", total=cfg.clients.per_round)
            for rnd in range(run.first_round, rounds + 1):
                plan = sim.method.plan(rnd)
                stage = "full model" if plan.full else f"stage {plan.stage}/{plan.num_stages}"
                progress.update(round_bar, description=f"round {rnd} ({stage})")
                progress.reset(client_bar, total=min(cfg.clients.per_round, len(sim.server.eligible(plan))))
                run.record(sim.run_round(rnd, on_client=lambda: progress.advance(client_bar)), sim.server)
                progress.advance(round_bar)
        return run.finish(sim.server, sim.final_accuracy(), sim.validation_accuracy(), **sim.setup)
