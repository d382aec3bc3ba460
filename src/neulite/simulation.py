"""The in-process driver: a federation of simulated clients around one method, round by round.

A thin loop over the algorithm core: it samples among the clients whose budget fits the round's
stage, hands each a `ClientTask`, runs `local_update` on the client's own data and gives the
replies to the method. Flower's driver makes the same calls over the network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from neulite.algorithms.base import Method
from neulite.algorithms.payload import ClientResult, nbytes
from neulite.algorithms.registry import make_method
from neulite.config import Config
from neulite.data import TensorDataset
from neulite.errors import NeuliteError
from neulite.memory import estimate
from neulite.federation import MB, Client, augment_enabled, client_seed, load_splits, make_clients
from neulite.models.stage_net import StageNet, StagePlan
from neulite.models.zoo import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRecord:
    """Per-round metrics; `accuracy`/`loss` are the round's stage model on the test set (NaN when not evaluated)."""

    round: int
    stage: int
    eligible: int
    participants: int
    accuracy: float
    loss: float
    train_loss: float
    bytes_down: int
    bytes_up: int
    wall_seconds: float
    stage_peak_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Simulation:
    """Clients, data and method for one config; `run_round` advances the experiment by one round."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.splits = load_splits(cfg)
        model = build_model(cfg.model.name, self.splits.input_shape, self.splits.train.num_classes, cfg.model.width, cfg.model.blocks)
        self.net = StageNet(model)
        self.method: Method = make_method(self.net, cfg)
        # the full model's peak is the yardstick for budgets, whatever network the method trains
        self.full_peak = estimate(self.net, self.net.plan(0), cfg.train.batch_size).total
        self.clients = make_clients(cfg, self.splits, self.full_peak)
        self.method.setup(self.clients)
        self.augment = augment_enabled(cfg, self.splits)
        self._rng = np.random.default_rng([cfg.seed, 2])
        self.participated: set[int] = set()
        self.check_feasible()

    def eligible(self, plan: StagePlan) -> list[tuple[Client, int]]:
        """The clients that can take part in a stage, each with the capacity level it would train."""
        levels = [(c, self.method.assign(plan, c.budget)) for c in self.clients]
        return [(c, level) for c, level in levels if level is not None]

    def check_feasible(self) -> None:
        """Fail before training if some stage has no client that can hold it."""
        largest = max(c.budget for c in self.clients)
        for plan in self.method.plans():
            if not self.eligible(plan):
                peak = self.method.memory(plan).total
                what = "full-model training" if plan.full else f"stage {plan.stage}"
                raise NeuliteError(
                    f"budget no stage fits: {what} needs {peak / MB:.1f} MB at batch {self.cfg.train.batch_size}, "
                    f"the largest client budget is {largest / MB:.1f} MB (raise the budgets or lower train.batch_size)"
                )

    def run_round(self, rnd: int, on_client: Callable[[], None] | None = None) -> RoundRecord:
        start = time.perf_counter()
        plan = self.method.plan(rnd)
        eligible = self.eligible(plan)
        k = min(self.cfg.clients.per_round, len(eligible))
        chosen = [eligible[i] for i in sorted(self._rng.choice(len(eligible), size=k, replace=False))]
        results: list[ClientResult] = []
        down = up = 0
        for client, level in chosen:
            task = self.method.configure_train(rnd, plan, level, client_seed(self.cfg.seed, rnd, client.cid))
            down += nbytes(task.arrays)
            try:
                result = self.method.client_update(task, client.train, augment=self.augment)
            except NeuliteError as exc:
                log.warning("client %d left out of round %d: %s", client.cid, rnd, exc)
                continue
            finally:
                if on_client is not None:
                    on_client()
            up += nbytes(result.arrays)
            results.append(result)
            self.participated.add(client.cid)
        if not results:
            raise NeuliteError(f"round {rnd}: every sampled client failed; stopping (the last checkpoint is kept)")
        self.method.aggregate_train(plan, results)
        acc = loss = float("nan")
        if rnd % self.cfg.eval.every == 0 or rnd == self.cfg.method.rounds:
            acc, loss = self.method.evaluate(plan, self.splits.test)
        train_loss = float(np.average([r.metrics["train_loss"] for r in results], weights=[r.num_examples for r in results]))
        return RoundRecord(
            rnd, plan.stage, len(eligible), len(results), acc, loss, train_loss, down, up,
            time.perf_counter() - start, self.method.memory(plan).total,
        )

    def final_accuracy(self) -> tuple[float, float]:
        """(accuracy, loss) of the deployable model on the global test set."""
        return self.method.evaluate(self.method.final_plan(), self.splits.test)

    def validation_accuracy(self) -> float:
        """Accuracy of the deployable model on the union of the clients' validation splits (for tuning)."""
        vals = [c.val for c in self.clients if len(c.val)]
        if not vals:
            return float("nan")
        return self.method.evaluate(self.method.final_plan(), TensorDataset.concat(vals))[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.method.net.state_dict(), "method": self.method.state_dict(),
            "rng": self._rng.bit_generator.state, "participated": sorted(self.participated),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.net.load_state_dict(state["net"])
        self.method.load_state_dict(state["method"])
        self._rng.bit_generator.state = state["rng"]
        self.participated = set(state["participated"])

