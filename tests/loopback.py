"""A Flower `Grid` that delivers every message to a ClientApp in this process: the Flower driver's
whole code path (strategy, wire format, ClientApp handlers) without Ray or a SuperLink; and a
ClientApp whose nodes misbehave on purpose."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from neulite.flower.client_app import make_client_app


class LoopbackGrid(Grid):
    """Nodes 1..n holding partitions 0..n-1; a message whose handler raises is answered with an error,
    and one whose handler takes longer than the timeout is not answered (as if its reply came late:
    on a real grid the nodes work in parallel, so each has the whole timeout)."""

    def __init__(self, app: ClientApp, run_config: dict[str, Any], num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            p + 1: Context(
                run_id=1,
                node_id=p + 1,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for p in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            started = time.monotonic()
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # a failing node, as Flower reports it
                reply = Message(Error(code=0, reason=str(exc)), reply_to=message)
            if timeout is None or time.monotonic() - started <= timeout:
                replies.append(reply)
        return replies

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


def faulty_app(run_config: dict, faults: dict[int, str], from_round: int = 1, hang: float = 0.0) -> ClientApp:
    """The real ClientApp, except that the partitions in `faults` misbehave from `from_round` on.

    Training faults: "error" (the node fails), "hang" (sleeps `hang` seconds in its first faulty
    round), "nan", "shape", "huge" (1e30), "inflate" (claims 10**12 examples). Profiling faults:
    "steal" (claims partition 0), "outside" (a partition that does not exist), "budget" (-1 bytes).
    """
    real = make_client_app(run_config)
    app = ClientApp()

    def fault_of(context: Context) -> str | None:
        return faults.get(int(context.node_config["partition-id"]))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        reply = real(msg, context)
        profile, fault = reply.content.config_records["profile"], fault_of(context)
        if fault == "steal":
            profile["partition-id"] = 0
        elif fault == "outside":
            profile["partition-id"] = 10**6
        elif fault == "budget":
            profile["budget-bytes"] = -1
        return reply

    @app.query("calibrate")
    def calibrate(msg: Message, context: Context) -> Message:
        return real(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rnd = msg.content.config_records["config"]["round"]
        fault = fault_of(context) if rnd >= from_round else None
        if fault == "error":
            raise RuntimeError("device out of memory")
        if fault == "hang" and rnd == from_round:
            time.sleep(hang)
        reply = real(msg, context)
        arrays = dict(reply.content.array_records["arrays"].to_torch_state_dict())
        name = next(n for n in arrays if arrays[n].is_floating_point())
        if fault in ("nan", "huge"):
            arrays[name] = torch.full_like(arrays[name], float("nan") if fault == "nan" else 1e30)
        elif fault == "shape":
            arrays[name] = torch.zeros(7)
        elif fault == "inflate":
            reply.content.metric_records["metrics"]["num-examples"] = 10**12
        reply.content.array_records["arrays"] = ArrayRecord(torch_state_dict=arrays)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return real(msg, context)

    return app
