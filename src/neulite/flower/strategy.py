"""A Flower strategy that drives neulite's core `Server`.

The strategy adds only transport: it finds which node holds which partition and how much memory
it has (`profile_nodes`, once before training), turns the server's per-client tasks into
messages, and checks every reply before the server aggregates it. Stage schedule, eligibility,
sampling and aggregation stay in the core, so Flower and `neulite run` train the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from neulite.algorithms.base import Method
from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.data import TensorDataset
from neulite.errors import NeuliteError
from neulite.flower.wire import decode_result, encode_task
from neulite.memory import MIB
from neulite.server import Round, RoundRecord, Server

log = logging.getLogger(__name__)


MAX_BUDGET = 2**50
"""The largest budget a node may report (1 PiB): beyond it a claim is not a device's."""


class NodeProfile(NamedTuple):
    """What a node answered the profiling query with, once checked."""

    node: int
    budget: int  # bytes
    source: str  # where the node took its budget from: "node-config", "measured", or the budget model


def profile_nodes(
    grid: Grid, full_peak: int, *, partitions: int, min_nodes: int, wait: float
) -> dict[int, NodeProfile]:
    """Ask every connected node for its partition and budget: {partition id: its `NodeProfile`}.

    Waits up to `wait` seconds for `min_nodes` to connect and as long again for their answers
    (a node loads its data first), and fails if fewer than `min_nodes` answer. A node that errors,
    claims a partition outside [0, partitions) or one another node holds, or reports a budget that
    is not a positive number of bytes up to `MAX_BUDGET`, is left out and logged.
    """
    deadline = time.monotonic() + wait
    while len(nodes := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise NeuliteError(f"only {len(nodes)} of {min_nodes} nodes connected within {wait:.0f} s (node-wait)")
        time.sleep(1.0)
    query = RecordDict({"config": ConfigRecord({"full-peak": full_peak})})
    replies = grid.send_and_receive(
        [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes], timeout=wait
    )
    found: dict[int, NodeProfile] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d left out: profiling failed: %s", node, reply.error.reason)
            continue
        profile = reply.content.config_records.get("profile", {})
        cid, budget = profile.get("partition-id"), profile.get("budget-bytes")
        if not isinstance(cid, int) or not isinstance(budget, int):
            log.warning("node %d left out: malformed profile %s", node, dict(profile))
        elif not 0 <= cid < partitions:
            log.warning("node %d left out: partition %d is not in [0, %d)", node, cid, partitions)
        elif not 0 < budget <= MAX_BUDGET:
            log.warning("node %d left out: budget %d bytes is not in (0, %d]", node, budget, MAX_BUDGET)
        elif cid in found:
            log.warning("node %d left out: partition %d is already held by node %d", node, cid, found[cid].node)
        else:
            source = str(profile.get("budget-source"))[:64]  # a node's words: kept short
            found[cid] = NodeProfile(node, budget, source)
            log.info("node %d: partition %d, budget %.1f MiB (%s)", node, cid, budget / MIB, source)
    if len(found) < min_nodes:
        raise NeuliteError(
            f"only {len(found)} of {min_nodes} nodes answered the profiling query within {wait:.0f} s (node-wait); "
            "stopping before training (on the simulation engine, nodes that never answer usually mean Ray's "
            "workers did not start: see Ray's log)"
        )
    return dict(sorted(found.items()))


class NodeQuery:
    """`Server.query` over Flower: the task as a `query.calibrate` message to every node, each
    reply checked against the method's calibration spec (a node that fails or replies badly is
    left out and logged)."""

    def __init__(self, grid: Grid, nodes: dict[int, int], method: Method, timeout: float) -> None:
        self.grid, self.nodes, self.method, self.timeout = grid, nodes, method, timeout

    def __call__(self, task: ClientTask) -> dict[int, ClientResult]:
        cids = {node: cid for cid, node in self.nodes.items()}
        content = encode_task(task, self.method.cfg.model.blocks)
        messages = [Message(content, dst_node_id=node, message_type="query.calibrate") for node in self.nodes.values()]
        spec = self.method.calibration_spec()
        results: dict[int, ClientResult] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            cid = cids.get(reply.metadata.src_node_id)
            if cid is None or cid in results or reply.has_error():
                log.warning("calibration reply from node %d left out", reply.metadata.src_node_id)
                continue
            try:
                results[cid] = decode_result(reply.content, spec, required=())
            except NeuliteError as exc:
                log.warning("calibration reply of partition %d left out: %s", cid, exc)
        return results


class NeuliteStrategy(Strategy):
    """Flower strategy over a neulite `Server`.

    Parameters
    ----------
    server : Server
        The core server, built from the budgets the nodes reported (`profile_nodes`).
    nodes : dict[int, int]
        Partition id -> Flower node id.
    test : TensorDataset
        The server's test set for per-round evaluation of the stage model.
    on_round : Callable[[RoundRecord, Server], None]
        Called after every aggregated round (the results folder's metrics and checkpoint).
    first_round : int (default: 1)
        The neulite round Flower's round 1 is (greater than 1 when resuming).
    validate : bool (default: True)
        After the last round, evaluate the deployable model on the validation splits of the nodes
        that fit some stage (the only evaluation sent to nodes; test accuracy is computed on the server).
    """

    def __init__(
        self,
        server: Server,
        nodes: dict[int, int],
        test: TensorDataset,
        on_round: Callable[[RoundRecord, Server], None],
        first_round: int = 1,
        validate: bool = True,
    ) -> None:
        self.server, self.nodes, self.test = server, nodes, test
        self.cids = {node: cid for cid, node in nodes.items()}
        self.on_round, self.rounds_before, self.validate = on_round, first_round - 1, validate
        self.round: Round | None = None
        self.validation_accuracy = float("nan")

    def summary(self) -> None:
        m = self.server.method
        log.info(
            "neulite %s: %d nodes, %d per round, stages %s",
            self.server.cfg.method.name,
            len(self.nodes),
            self.server.cfg.clients.per_round,
            [p.stage for p in m.plans()],
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.round = self.server.configure(server_round + self.rounds_before)
        return [
            Message(
                encode_task(task, self.server.cfg.model.blocks),
                dst_node_id=self.nodes[cid],
                message_type=MessageType.TRAIN,
            )
            for cid, task in self.round.tasks.items()
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply against its task; aggregate the usable ones (the global model lives in the method)."""
        rnd = self.round
        if rnd is None:
            raise RuntimeError("aggregate_train before configure_train")
        results: dict[int, ClientResult] = {}
        for reply in replies:
            cid = self.cids.get(reply.metadata.src_node_id)
            if cid not in rnd.tasks or cid in results:
                log.warning("round %d: unexpected reply from node %d ignored", rnd.number, reply.metadata.src_node_id)
            elif reply.has_error():
                log.warning("round %d: partition %d left out: the node failed: %s", rnd.number, cid, reply.error.reason)
            else:
                try:
                    results[cid] = decode_result(reply.content, self.server.method.reply_spec(rnd.tasks[cid]))
                except NeuliteError as exc:
                    log.warning("round %d: partition %d left out: %s", rnd.number, cid, exc)
        if silent := sorted(set(rnd.tasks) - set(results)):
            log.warning("round %d: no usable reply from partitions %s", rnd.number, silent)
        record = self.server.aggregate(rnd, results, self.test)
        self.on_round(record, self.server)
        return None, MetricRecord(
            {"train_loss": record.train_loss, "participants": record.participants, "accuracy": record.accuracy}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.validate or server_round + self.rounds_before != self.server.cfg.method.rounds:
            return []
        record = encode_task(self.server.method.evaluation_task(), self.server.cfg.model.blocks)
        return [
            Message(record, dst_node_id=self.nodes[cid], message_type=MessageType.EVALUATE)
            for cid in self.server.fitting_clients()
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Validation accuracy of the deployable model, weighted by the nodes' validation sizes."""
        correct = total = 0.0
        seen: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            cid = self.cids.get(node)
            if metrics is None or cid is None or cid in seen or not {"accuracy", "num-examples"} <= set(metrics):
                log.warning("validation reply from node %d left out", node)
                continue
            accuracy, count = metrics["accuracy"], metrics["num-examples"]
            if not (isinstance(count, int) and 0 <= count <= self.server.partition_sizes.get(cid, 0)):
                log.warning("validation reply of partition %d left out: it claims %r examples", cid, count)
                continue
            if not (isinstance(accuracy, (int, float)) and 0.0 <= accuracy <= 1.0):
                log.warning("validation reply of partition %d left out: accuracy %r", cid, accuracy)
                continue
            seen.add(cid)
            correct += float(accuracy) * count
            total += count
        if not total:
            return None
        self.validation_accuracy = correct / total
        return MetricRecord({"validation_accuracy": self.validation_accuracy})
