"""The server's side of a round, shared by every driver: who may train, who is sampled, what each
is sent, and what happens to the replies.

The in-process simulator and the Flower strategy both drive a `Server`; they differ only in how
tasks reach clients and how replies come back. Clients are named by their partition id (`cid`),
so the same config and seed sample the same clients whichever driver moves the bytes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from neulite.algorithms.base import Method
from neulite.algorithms.payload import ClientResult, ClientTask, check_claim, check_result
from neulite.config import Config
from neulite.data import TensorDataset
from neulite.errors import NeuliteError
from neulite.memory import MIB
from neulite.models.arrays import Arrays, nbytes
from neulite.models.stage_net import StagePlan

log = logging.getLogger(__name__)

Query = Callable[[ClientTask], Mapping[int, ClientResult]]
"""How a driver asks every client to answer a task outside training (HeteroFL's calibration):
the replies that arrived, by client id (the server checks them as it checks training replies)."""


@dataclass(frozen=True)
class RoundRecord:
    """Per-round metrics; `accuracy`/`loss` are the round's stage model on the test set (NaN when not
    evaluated); `stage` is the stage trained (0: the whole model).

    `slowest_client_seconds` is the longest local training a client reported: the round's length on
    the clients' side when they train in parallel, as in a real federation (the in-process
    simulator runs them one after another, which `wall_seconds` includes). `recomputing`: the
    participants that took part only by recomputing (train.recompute = "auto").
    """

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
    slowest_client_seconds: float
    recomputing: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Round:
    """One configured round: its stage, how many clients could train it, and the sampled clients' tasks."""

    number: int
    plan: StagePlan
    eligible: int
    tasks: dict[int, ClientTask]
    started: float


class Server:
    """Eligibility, sampling and aggregation around one method, for clients with known budgets.

    Parameters
    ----------
    method : Method
        The algorithm; the server only calls its hooks.
    budgets : Mapping[int, int]
        Each client's (cid's) memory budget in bytes, as the client reported it.
    cfg : Config
        `clients.per_round` (sample size), `seed` (sampling), `eval.every` and `method.rounds`.
    full_peak : int
        Bytes full-model training needs: the yardstick reported next to the stage peaks.
    query : Query
        The driver's way to ask every client for a calibration reply before an evaluation, for
        methods that need one (`Method.calibration_task`).
    partition_sizes : Mapping[int, int]
        Each client's number of training samples, known to the server from the partition: a
        reply claiming more is refused.
    """

    def __init__(
        self,
        method: Method,
        budgets: Mapping[int, int],
        cfg: Config,
        full_peak: int,
        query: Query,
        partition_sizes: Mapping[int, int],
    ) -> None:
        self.method = method
        self.query = query
        self.partition_sizes = dict(partition_sizes)
        self.budgets = dict(sorted(budgets.items()))
        self.cfg = cfg
        self.full_peak = full_peak
        self.participated: set[int] = set()
        self._rng = np.random.default_rng([cfg.seed, 2])
        self._eligible: dict[StagePlan, list[tuple[int, int]]] = {}

    def eligible(self, plan: StagePlan) -> list[tuple[int, int]]:
        """(cid, capacity level) of every client that can train the stage, in cid order (once per
        plan: budgets are fixed, so a round's sampling does not grow with the federation)."""
        if plan not in self._eligible:
            levels = [(cid, self.method.assign(plan, budget)) for cid, budget in self.budgets.items()]
            self._eligible[plan] = [(cid, level) for cid, level in levels if level is not None]
        return self._eligible[plan]

    def fitting_clients(self) -> list[int]:
        """The clients that fit at least one stage: the only ones ever sent work (or asked to validate)."""
        plans = self.method.plans()
        return [
            cid for cid, budget in self.budgets.items() if any(self.method.assign(p, budget) is not None for p in plans)
        ]

    def check_feasible(self) -> None:
        """Fail before training if some stage has no client that can hold it."""
        largest = max(self.budgets.values(), default=0)
        for plan in self.method.plans():
            if not self.eligible(plan):
                leanest = self._leanest(plan)
                peak = self.method.memory(leanest).total
                what = ("full-model training" if plan.full else f"stage {plan.stage}") + (
                    ", recomputing," if leanest is not plan else ""
                )
                lighter = (
                    ""
                    if plan.full or peak < self.full_peak
                    else f"; it saves nothing on full-model training ({self.full_peak / MIB:.1f} MiB): the blocks are "
                    "too light for the scaffolding around them, use fewer, larger blocks (model.blocks = N)"
                )
                raise NeuliteError(
                    f"budget no stage fits: {what} needs {peak / MIB:.1f} MiB at batch {self.cfg.train.batch_size}, "
                    f"the largest client budget is {largest / MIB:.1f} MiB (raise the budgets or lower train.batch_size)"
                    f"{lighter}"
                )

    def configure(self, number: int) -> Round:
        """Sample up to `clients.per_round` eligible clients and build each one's task for round `number`."""
        started = time.perf_counter()
        plan = self.method.plan(number)
        self.method.begin_round(plan)
        eligible = self.eligible(plan)
        k = min(self.cfg.clients.per_round, len(eligible))
        chosen = [eligible[i] for i in sorted(self._rng.choice(len(eligible), size=k, replace=False))]
        tasks = {
            cid: self.method.configure_train(number, plan, level, client_seed(self.cfg.seed, number, cid))
            for cid, level in chosen
        }
        return Round(number, plan, len(eligible), tasks, started)

    def accept(self, configured: Round, replies: Mapping[int, ClientResult]) -> dict[int, ClientResult]:
        """The replies fit to touch the global model, each left-out one logged with its reason.

        A reply must be exactly the finite tensors its task asked for; its update (RMS distance from
        what was sent) must be within `server.outlier_ratio` times the sent model's own RMS and, where
        three or more well-formed replies trained the same tensors (by name: HeteroFL's widths are
        alike), times their median update (a client that also pre-trains fresh blocks moves further
        than one that does not); and it may claim no more examples than the client's partition holds.
        """
        number, checked, kinds = configured.number, {}, {}
        for cid, result in replies.items():
            try:
                if cid not in configured.tasks:
                    raise NeuliteError("it was not sampled this round")
                spec = self.method.reply_spec(configured.tasks[cid])
                check_result(result, spec)
                checked[cid], kinds[cid] = result, frozenset(spec)  # a kind: the names trained, any width
            except NeuliteError as exc:
                log.warning("round %d: client %d left out: %s", number, cid, exc)
        if ratio := self.cfg.server.outlier_ratio:
            moved = {cid: update_size(configured.tasks[cid].arrays, r.arrays) for cid, r in checked.items()}
            alike = {kind: [moved[cid] for cid in moved if kinds[cid] == kind] for kind in kinds.values()}
            typical = {kind: float(np.median(sizes)) if len(sizes) >= 3 else math.inf for kind, sizes in alike.items()}
            for cid, size in moved.items():
                scale, usual = rms(configured.tasks[cid].arrays), typical[kinds[cid]]
                if size > ratio * scale or size > ratio * usual:
                    log.warning(
                        "round %d: client %d left out: its update (RMS %.3g) exceeds server.outlier_ratio = %g times "
                        "the sent model's RMS (%.3g) or the median update of the round's clients that trained "
                        "the same tensors (%.3g)",
                        number,
                        cid,
                        size,
                        ratio,
                        scale,
                        usual,
                    )
                    del checked[cid]
        for cid, result in list(checked.items()):
            try:
                check_claim(result, self.partition_sizes.get(cid))
            except NeuliteError as exc:
                log.warning("round %d: client %d left out: %s", number, cid, exc)
                del checked[cid]
        return checked

    def aggregate(self, configured: Round, replies: Mapping[int, ClientResult], test: TensorDataset) -> RoundRecord:
        """Check the replies that arrived, merge the usable ones, evaluate when due, and report the round."""
        number, plan = configured.number, configured.plan
        results = self.accept(configured, replies)
        needed = min(self.cfg.clients.min_replies, len(configured.tasks))
        if len(results) < needed:
            raise NeuliteError(
                f"round {number}: {len(results)} of {len(configured.tasks)} sampled clients returned a usable result, "
                f"fewer than clients.min_replies={needed}; stopping (the last checkpoint is kept)"
            )
        self.method.aggregate_train(number, plan, list(results.values()))
        if bad := [
            n for n, t in self.method.net.state_dict().items() if t.is_floating_point() and not t.isfinite().all()
        ]:
            raise NeuliteError(
                f"round {number}: the merged model holds NaN or Inf in {bad[0]!r}; stopping (the last checkpoint is kept)"
            )
        self.participated.update(results)
        acc = loss = float("nan")
        if number % self.cfg.eval.every == 0 or number == self.cfg.method.rounds:
            acc, loss = self.evaluate(plan, test)
        weights = [r.num_examples for r in results.values()]
        train_loss = float(np.average([r.metrics["train_loss"] for r in results.values()], weights=weights))
        return RoundRecord(
            number,
            plan.stage,
            configured.eligible,
            len(results),
            acc,
            loss,
            train_loss,
            sum(nbytes(t.arrays) for t in configured.tasks.values()),
            sum(nbytes(r.arrays) for r in results.values()),
            time.perf_counter() - configured.started,
            self.method.memory(plan).total,
            max(
                (r.metrics["train_seconds"] for r in results.values() if "train_seconds" in r.metrics),
                default=float("nan"),
            ),
            sum(configured.tasks[cid].plan.recompute and not plan.recompute for cid in results),
        )

    def evaluate(self, plan: StagePlan, data: TensorDataset) -> tuple[float, float]:
        """(accuracy, loss) of `plan`'s model on `data`, after the calibration query the method may need."""
        task = self.method.calibration_task()
        if task is not None:
            spec = self.method.calibration_spec()
            replies = {}
            for cid, reply in self.query(task).items():
                try:
                    check_result(reply, spec)
                    check_claim(reply, self.partition_sizes.get(cid))
                    replies[cid] = reply
                except NeuliteError as exc:
                    log.warning("calibration reply of client %d left out: %s", cid, exc)
            if not replies:
                raise NeuliteError(f"{self.cfg.method.name} cannot evaluate: no client answered the calibration query")
            self.method.calibrate(list(replies.values()))
        return self.method.evaluate(plan, data)

    def memory_rows(self) -> list[dict[str, Any]]:
        """Estimated peak of each stage the method trains (and of its wider windows, of its leanest
        recomputing plan where a client may recompute, and of full-model training), with how many
        clients fit it."""
        rows = []
        for plan in self.method.plans():
            shown = [(variant, "") for variant in (plan, *self.method.windows(plan))]
            if (leanest := self._leanest(plan)) is not plan:
                shown.append((leanest, ", recomputing"))
            for variant, suffix in shown:
                peak = self.method.memory(variant).total
                label = "full" if variant.full else f"stage {variant.stage}"
                if variant.first != variant.last:
                    label += f", blocks {variant.first}-{variant.last}"
                label += suffix
                rows.append(
                    {"label": label, "stage": variant.stage, "estimated_bytes": peak, "clients_fit": self._fit(peak)}
                )
        if not any(r["label"] == "full" for r in rows):
            rows.append(
                {
                    "label": "full",
                    "stage": 0,
                    "estimated_bytes": self.full_peak,
                    "clients_fit": self._fit(self.full_peak),
                }
            )
        return rows

    def _leanest(self, plan: StagePlan) -> StagePlan:
        """The least a client may fit with at `plan`'s stage: `plan` itself, or a recomputing variant of it."""
        leanest = min(self.method.variants(plan), key=lambda v: self.method.memory(v).total)
        return leanest if leanest.recompute and not plan.recompute else plan

    def _fit(self, peak: int) -> int:
        return sum(b >= peak for b in self.budgets.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.method.net.state_dict(),
            "method": self.method.state_dict(),
            "rng": self._rng.bit_generator.state,
            "participated": sorted(self.participated),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.net.load_state_dict(state["net"])
        self.method.load_state_dict(state["method"])
        self._rng.bit_generator.state = state["rng"]
        self.participated = set(state["participated"])


def rms(arrays: Arrays) -> float:
    """Root-mean-square of all floating elements: the scale of a model's weights."""
    floats = [t.double() for t in arrays.values() if t.is_floating_point()]
    count = sum(t.numel() for t in floats)
    return math.sqrt(sum(float(t.square().sum()) for t in floats) / count) if count else 0.0


def update_size(sent: Arrays, returned: Arrays) -> float:
    """Root-mean-square change of the floating tensors a client returned, against what it was sent."""
    total, count = 0.0, 0
    for name, value in returned.items():
        before = sent.get(name)
        if before is not None and value.is_floating_point() and before.shape == value.shape:
            total += float((value.double() - before.double()).square().sum())
            count += value.numel()
    return math.sqrt(total / count) if count else 0.0


def client_seed(seed: int, rnd: int, cid: int) -> int:
    """A seed for one client's local training in one round, independent of who else trains."""
    return int(np.random.SeedSequence([seed, rnd, cid]).generate_state(1)[0])
