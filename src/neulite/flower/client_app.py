"""The Flower ClientApp: a node's data shard, memory budget and the core client update.

Four message types:
  query            (profiling, once before training): the node's partition id, budget and data size;
  query.calibrate  a `ClientTask` in, `Method.client_calibrate` on the node's training shard (HeteroFL's
                   BatchNorm statistics), its reply out;
  train            a `ClientTask` in, the core `Method.client_update` on the node's shard, the trained tensors out;
  evaluate         `Method.client_evaluate` of the deployable model on the node's validation split.

A node finds its shard from its node config (`partition-id`, as Flower's simulation engine sets
it or `flower-supernode --node-config` gives it). Its budget is `budget-mb` from the node config,
else what the experiment's budget model gives its partition (`clients.budget`; "measured" reads
the device's available memory), so a simulation sees the same federation as `neulite run`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from neulite.config import Config
from neulite.device_memory import warm_up
from neulite.errors import NeuliteError
from neulite.federation import Node, load_node, node_examples, simulated_budgets
from neulite.flower.run_config import parse_run_config
from neulite.flower.wire import decode_task, encode_result, task_blocks
from neulite.memory import MIB
from neulite.prefix_cache import PrefixStore

log = logging.getLogger(__name__)


def partition_id(context: Context, cfg: Config) -> int:
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int) or not 0 <= pid < cfg.data.num_clients:
        raise NeuliteError(
            f"node config partition-id must be an integer in [0, {cfg.data.num_clients}) (data.num_clients), got {pid!r}"
        )
    return pid


def node_budget(context: Context, cfg: Config, cid: int, full_peak: int) -> tuple[int, str]:
    """(bytes, where they come from): node config, else the experiment's budget model. A measured
    budget is what the node has left once it holds what a training process holds before it trains
    (its shard, the network's skeleton, the runtime's one-time set-up): under an enforced memory
    limit, that limit less the node's runtime baseline."""
    budget_mb = context.node_config.get("budget-mb")
    if budget_mb is not None:
        if not isinstance(budget_mb, (int, float)) or budget_mb <= 0:
            raise NeuliteError(f"node config budget-mb must be a positive number, got {budget_mb!r}")
        return int(budget_mb * MIB), "node-config"
    if cfg.clients.budget == "measured":
        load_node(cfg, cid)
        warm_up()
    return simulated_budgets(cfg, full_peak)[cid], cfg.clients.budget


def make_client_app(run_config: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is `run_config` overridden by Flower's (for `run_simulation`,
    which passes none)."""
    app = ClientApp()
    base = dict(run_config or {})
    # frozen-prefix caches, per process: they pay off where a process serves a node for many rounds
    # (a Ray actor); a SuperNode starts a fresh ClientApp process per message, which starts empty
    prefixes: dict[float, PrefixStore] = {}

    def config_of(context: Context) -> Config:
        return parse_run_config({**base, **context.run_config})[0]

    def node_of(context: Context, task: RecordDict) -> tuple[Config, Node]:
        cfg = config_of(context)
        if cfg.model.blocks == "auto":  # the server planned once; a node builds what it chose
            cfg = cfg.replace(model=dataclasses.replace(cfg.model, blocks=task_blocks(task)))
        return cfg, load_node(cfg, partition_id(context, cfg))

    @app.query()
    def profile(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        cid = partition_id(context, cfg)
        full_peak = int(msg.content.config_records["config"]["full-peak"])
        budget, source = node_budget(context, cfg, cid, full_peak)
        reply = ConfigRecord(
            {
                "partition-id": cid,
                "budget-bytes": budget,
                "budget-source": source,
                "num-examples": node_examples(cfg, cid),
            }
        )
        return Message(RecordDict({"profile": reply}), reply_to=msg)

    @app.query("calibrate")
    def calibrate(msg: Message, context: Context) -> Message:
        _, node = node_of(context, msg.content)
        result = node.method.client_calibrate(decode_task(msg.content), node.train)
        return Message(encode_result(result), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, node = node_of(context, msg.content)
        task = decode_task(msg.content)
        store = prefixes.setdefault(cfg.train.prefix_cache_mb, PrefixStore(cfg.train.prefix_cache_mb))
        result = node.method.client_update(task, node.train, augment=node.augment, cache=store.get(node.cid))
        return Message(encode_result(result), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, node = node_of(context, msg.content)
        task = decode_task(msg.content)
        accuracy, loss = node.method.client_evaluate(task, node.val) if len(node.val) else (0.0, 0.0)
        metrics = MetricRecord({"accuracy": accuracy, "loss": loss, "num-examples": len(node.val)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
