"""Every registered method runs on the Flower driver exactly as in the in-process simulator: the
same rows (stages, eligibility, sampling, bytes) and the same model, bit for bit, through the
strategy, the wire format and the ClientApp (delivered in-process by `LoopbackGrid`); hostile and
failing nodes are left out on that same path."""

import dataclasses
import json
import logging
import time

import pytest
import torch

from neulite.algorithms.registry import METHODS
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.simulation import run_experiment

pytest.importorskip("flwr")
from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from neulite import federation  # noqa: E402
from neulite.federation import client_data, client_method, load_node  # noqa: E402
from neulite.flower.client_app import make_client_app  # noqa: E402
from neulite.flower.grid import PromptGrid  # noqa: E402
from neulite.flower.server_app import run  # noqa: E402
from neulite.flower.simulation import run_config_for  # noqa: E402

from .loopback import LoopbackGrid, faulty_app  # noqa: E402

SMALL = [
    "data.num_clients=4",
    "clients.per_round=3",
    "method.rounds=2",
    "model.blocks=2",  # a stage change: the frozen prefix goes down, only the trained block comes up
    "train.local_epochs=1",
    "data.name=digits",  # 8x8 images: the wire and the strategy are what is tested, not the pixels
    "data.train_size=400",
    "model.width=0.5",
    "eval.every=2",
    "clients.fractions=[0.3, 1.1]",
]


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    for key in ("_run_id", "_node_id", "_task_id"):  # who is sending: Flower's runtime sets these
        monkeypatch.setattr(TaskIdentity, key, 1)
    federation._client_data.cache_clear()
    client_method.cache_clear()


# every method but the NeuLite ablations, whose plans and task configs (the Mentor's and the
# Harmonizer's switches) neulite-adaptive and profl already send over the wire in both positions,
# and the cyclic schedule, whose plans are neulite's in another order
ABLATIONS = ("neulite-no-mentor", "neulite-no-harmonizer", "neulite-plain", "neulite-cyclic")


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ABLATIONS])
def test_every_method_runs_on_flower_as_in_process(tmp_path, name: str):
    cfg = load_config(overrides=[*SMALL, f"method.name={name}"])
    local = run_experiment(cfg, tmp_path / "local")
    run_config = run_config_for(cfg, tmp_path / "flower")
    flower = run(LoopbackGrid(make_client_app(run_config), run_config, cfg.data.num_clients), run_config)
    keys = ("round", "stage", "eligible", "participants", "bytes_down", "bytes_up", "accuracy", "train_loss")
    assert [{k: r[k] for k in keys} for r in _rows(tmp_path / "flower")] == [
        {k: r[k] for k in keys} for r in _rows(tmp_path / "local")
    ]
    for key in ("final_accuracy", "validation_accuracy", "participation", "peak_memory_bytes"):
        assert flower[key] == local[key], key
    a, b = (
        torch.load(tmp_path / "local" / "model.pt", weights_only=True),
        torch.load(tmp_path / "flower" / "model.pt", weights_only=True),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FEDAVG = [
    "clients.fractions=[1.2, 1.3]",
    "method.name=fedavg",
    "data.name=digits",  # 8x8 images: the wire and the strategy are what is tested, not the pixels
    "train.local_epochs=1",
]


def test_hostile_nodes_cannot_claim_what_is_not_theirs(tmp_path, caplog):
    cfg = load_config(overrides=[*FEDAVG, "data.num_clients=6", "clients.per_round=3", "method.rounds=2"])
    run_config = {**run_config_for(cfg, tmp_path), "min-nodes": 3}
    faults = {1: "inflate", 2: "huge", 3: "steal", 4: "outside", 5: "budget"}
    with caplog.at_level(logging.WARNING):
        summary = run(LoopbackGrid(faulty_app(run_config, faults), run_config, 6), run_config)
    assert summary["nodes"] == 3  # partitions 0, 1, 2: the thief, the outsider and the negative budget are out
    assert [r["participants"] for r in _rows(tmp_path)] == [1, 1]  # only partition 0's replies are merged
    for reason in (
        "partition 0 is already held",
        "is not in [0, 6)",
        "budget -1 bytes",
        "more than the client's partition",
    ):
        assert any(reason in m for m in caplog.messages), reason
    assert any("client 2 left out: its update" in m for m in caplog.messages)
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(t.isfinite().all() and t.abs().max() < 1e3 for t in model.values() if t.is_floating_point())


def test_too_few_usable_replies_stop_a_flower_run_and_resume_continues_it(tmp_path):
    cfg = load_config(
        overrides=[*FEDAVG, "data.num_clients=4", "clients.per_round=4", "method.rounds=3", "clients.min_replies=2"]
    )
    run_config = run_config_for(cfg, tmp_path)
    faulty = faulty_app(run_config, {1: "nan", 2: "shape", 3: "error"}, from_round=2)
    with pytest.raises(NeuliteError, match="round 2: 1 of 4 sampled clients returned a usable result"):
        run(LoopbackGrid(faulty, run_config, 4), run_config)
    assert not (tmp_path / "summary.json").exists()
    assert [r["participants"] for r in _rows(tmp_path)] == [4]  # round 1 is kept, checkpointed
    resumed = {**run_config, "resume": True}  # the nodes recover: the run continues after round 1
    run(LoopbackGrid(make_client_app(resumed), resumed, 4), resumed)
    assert [r["participants"] for r in _rows(tmp_path)] == [4, 4, 4]
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 3


def test_failing_and_hung_nodes_are_left_out_and_the_round_goes_on(tmp_path):
    cfg = load_config(overrides=[*FEDAVG, "data.num_clients=5", "clients.per_round=5", "method.rounds=2"])
    run_config = {**run_config_for(cfg, tmp_path), "round-timeout": 4.0}
    faults = {1: "nan", 2: "shape", 3: "error", 4: "hang"}
    summary = run(LoopbackGrid(faulty_app(run_config, faults, hang=4.5), run_config, 5), run_config)
    # round 1: only partition 0's reply is used (4 timed out); in round 2 partition 4 answers in time
    assert [r["participants"] for r in _rows(tmp_path)] == [1, 2]
    assert summary["participation"] == 0.4 and summary["final_accuracy"] > 0.1


def test_a_profiling_query_is_answered_from_the_data_alone(tmp_path):
    """A node builds no network to answer the profiling query: a device's first message costs its
    data, not the network (and torch's compiler, which building one imports)."""
    cfg = load_config(overrides=[*SMALL, "method.name=neulite"])
    run_config = run_config_for(cfg, tmp_path / "flower")
    grid = LoopbackGrid(make_client_app(run_config), run_config, cfg.data.num_clients)
    query = RecordDict({"config": ConfigRecord({"full-peak": 10**6})})
    [reply] = grid.send_and_receive([Message(query, dst_node_id=2, message_type=MessageType.QUERY)])
    profile = reply.content.config_records["profile"]
    assert profile["partition-id"] == 1 and profile["num-examples"] == len(client_data(cfg)[1][1][0]) > 0
    assert client_method.cache_info().currsize == 0
    assert load_node(cfg, 1).method.net.num_stages == 2 and client_method.cache_info().currsize == 1


def test_a_planned_network_is_planned_once_by_the_server_and_built_from_the_task_by_each_node(tmp_path, monkeypatch):
    """With model.blocks = "auto" the task carries the server's choice: a deployed node, a fresh
    process per message, would otherwise plan again for each one (seconds of CPU)."""
    plans = []
    planner = federation.auto_blocks
    monkeypatch.setattr(federation, "auto_blocks", lambda *args: plans.append(planner(*args)) or plans[-1])
    cfg = load_config(overrides=[*SMALL, "model.blocks=auto", "method.name=neulite", "method.rounds=3"])
    run_config = run_config_for(cfg, tmp_path)
    summary = run(LoopbackGrid(make_client_app(run_config), run_config, cfg.data.num_clients), run_config)
    assert len(plans) == 1, "a node planned again"
    assert summary["block_plan"] == dataclasses.asdict(plans[0]) and len(_rows(tmp_path)) == 3


class _SuperLink:
    """Node n's reply reaches it n/10 s after the push; each reply is pulled once, as from a SuperLink."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Message, float]] = {}

    def push_messages(self, messages):
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grid names them
            self.pending[message.object_id] = (message, time.monotonic() + message.metadata.dst_node_id / 10)
        return list(self.pending)

    def pull_messages(self, message_ids):
        now = time.monotonic()
        due = [i for i in message_ids if i in self.pending and self.pending[i][1] <= now]
        return [Message(RecordDict(), reply_to=self.pending.pop(i)[0]) for i in due]


def test_the_servers_grid_takes_replies_as_they_arrive_and_stops_at_its_timeout():
    """Flower's deployment grid pulls every 3 s: each exchange waited up to 3 s after its last reply."""
    grid = PromptGrid(_SuperLink())  # type: ignore[arg-type]

    def send(nodes, timeout):
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        started = time.monotonic()
        replies = grid.send_and_receive(messages, timeout=timeout)
        ids = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return sorted(ids[r.metadata.reply_to_message_id] for r in replies), time.monotonic() - started

    nodes, seconds = send([1, 4], timeout=10)
    assert nodes == [1, 4] and 0.4 <= seconds < 1.0
    nodes, seconds = send([2, 90], timeout=1.0)  # node 90 answers after the timeout
    assert nodes == [2] and 1.0 <= seconds < 1.5
