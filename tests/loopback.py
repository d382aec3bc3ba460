"""A Flower `Grid` that delivers every message to a ClientApp in this process: the Flower driver's
whole code path (strategy, wire format, ClientApp handlers) without Ray or a SuperLink."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid


class LoopbackGrid(Grid):
    """Nodes 1..n holding partitions 0..n-1; a message whose handler raises is answered with an error."""

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
            try:
                replies.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as exc:  # a failing node, as Flower reports it
                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=message))
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
