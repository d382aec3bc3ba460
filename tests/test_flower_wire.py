"""The Flower wire format: exactly the stage's tensors go down and exactly the trained ones come
back; malformed replies are rejected naming the problem. No Flower runtime needed."""

import pytest
import torch

from neulite.algorithms.payload import ClientResult
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.models.arrays import nbytes
from neulite.simulation import Simulation

pytest.importorskip("flwr")
from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from neulite.flower.run_config import parse_run_config  # noqa: E402
from neulite.flower.wire import decode_result, decode_task, encode_result, encode_task, task_blocks  # noqa: E402

pytestmark = pytest.mark.xdist_group("wire")  # one worker computes the shared reply

SMALL = [
    "method.name=neulite",
    "data.num_clients=4",
    "clients.per_round=2",
    "train.local_epochs=1",
    "method.rounds=3",
    "clients.fractions=[0.8, 1.1]",
    "data.train_size=400",
]


def test_each_stage_sends_down_only_prefix_and_trained_parts_and_up_only_trained_parts():
    sim = Simulation(load_config(overrides=SMALL))
    state = sim.method.net.state_dict()
    full_bytes = nbytes(state)
    for rnd in (1, 2, 3):
        configured = sim.server.configure(rnd)
        plan = configured.plan
        assert plan.stage == rnd
        results = {}
        for cid, task in configured.tasks.items():
            record = encode_task(task, 0)
            assert task_blocks(record) == 0
            sent = record.array_records["arrays"]
            frozen = [f"model.blocks.{i}." for i in range(rnd - 1)]
            assert list(sent.keys()) == sim.method.net.down_names(plan)
            assert all(any(n.startswith(p) for n in sent) for p in frozen)  # the frozen prefix goes down
            assert nbytes(decode_task(record).arrays) == nbytes(task.arrays) < full_bytes
            received = decode_task(record)
            assert (
                received.plan == plan
                and received.seed == task.seed
                and received.config == task.config
                and set(task.config) == {"lambda1", "lambda2", "lr", "local_epochs", "level"}
            )
            assert all(torch.equal(received.arrays[n], task.arrays[n]) for n in task.arrays)

            result = results[cid] = sim.method.client_update(received, sim.clients[cid].train, augment=False)
            reply = decode_result(encode_result(result), sim.method.reply_spec(task))
            up = sim.method.net.up_names(plan)
            assert sorted(reply.arrays) == sorted(up)
            assert nbytes(reply.arrays) == sum(state[n].numel() * state[n].element_size() for n in up)
            first_block = [n for n in state if n.startswith("model.blocks.0.")]
            returned = [n for n in reply.arrays if n.startswith("model.blocks.0.")]
            if rnd == 2:  # the Harmonizer trains only block 1's tail: the rest goes down, never back
                assert 0 < len(returned) < len(first_block)
            if rnd == 3:  # block 1 is wholly frozen: sent down, never returned
                assert not returned
        sim.server.aggregate(configured, results, sim.splits.test)


@pytest.fixture(scope="module")
def reply():
    """One client's reply to a round-1 task and what the server expects back; shared, never mutated."""
    sim = Simulation(load_config(overrides=SMALL))
    configured = sim.server.configure(1)
    cid, task = next(iter(configured.tasks.items()))
    result = sim.method.client_update(task, sim.clients[cid].train, augment=False)
    return result, sim.method.reply_spec(task)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda a: {**a, next(iter(a)): torch.zeros(3, 3)}, "expected"),
        (lambda a: {k: v for i, (k, v) in enumerate(a.items()) if i}, "missing"),
        (lambda a: {**a, "model.blocks.2.extra": torch.zeros(1)}, "unexpected tensor"),
    ],
    ids=["wrong-shape", "missing", "extra"],
)
def test_malformed_replies_are_rejected_naming_the_problem(corrupt, message, reply):
    result, spec = reply
    bad = ClientResult(corrupt(dict(result.arrays)), result.num_examples, result.metrics)
    with pytest.raises(NeuliteError, match=message):
        decode_result(encode_result(bad), spec)
    decode_result(encode_result(result), spec)  # the untouched reply passes


@pytest.mark.parametrize("blocks", [-1, 9, "4", True, None])
def test_a_task_naming_no_buildable_number_of_blocks_is_refused(blocks):
    config = {} if blocks is None else {"model-blocks": blocks}
    with pytest.raises(NeuliteError, match="model-blocks must be an integer in \\[0, 8\\]"):
        task_blocks(RecordDict({"config": ConfigRecord(config)}))


def test_a_reply_is_sized_up_before_any_tensor_is_deserialised(reply, monkeypatch):
    result, spec = reply
    padded = encode_result(result)
    array = padded.array_records["arrays"][next(iter(spec))]
    array.data = array.data + bytes(2**20)  # the right metadata, a mebibyte more bytes
    extra = encode_result(
        ClientResult({**result.arrays, "big": torch.zeros(2**16)}, result.num_examples, result.metrics)
    )
    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", lambda self: pytest.fail("deserialised a bad reply"))
    with pytest.raises(NeuliteError, match="more than its shape needs"):
        decode_result(padded, spec)
    with pytest.raises(NeuliteError, match="unexpected tensor 'big'"):
        decode_result(extra, spec)


def test_run_config_maps_to_the_experiment_config_and_rejects_unknown_keys():
    cfg, driver = parse_run_config(
        {"method.rounds": 4, "clients.fractions": "[0.2, 0.9]", "seed": 3, "out": "x", "round-timeout": 5.0}
    )
    assert (cfg.method.rounds, cfg.clients.fractions, cfg.seed) == (4, (0.2, 0.9), 3)
    assert (driver.out, driver.round_timeout) == ("x", 5.0)
    with pytest.raises(NeuliteError, match="unknown key 'rounds'"):
        parse_run_config({"rounds": 4})
    with pytest.raises(NeuliteError, match="method.nme"):
        parse_run_config({"method.nme": "fedavg"})


def test_a_task_whose_plan_fields_have_the_wrong_type_is_refused_naming_the_field():
    """A node takes nothing on trust from the server either: a plan field of the wrong type (bool
    is not an int here) is refused by name, not passed on to fail deep inside training."""
    sim = Simulation(load_config(overrides=SMALL))
    task = next(iter(sim.server.configure(1).tasks.values()))
    for field, value, kind in (("kept_segments", "x", "int"), ("stage", True, "int"), ("recompute", 1, "bool")):
        record = encode_task(task, 0)
        record.config_records["config"][f"plan-{field}"] = value
        with pytest.raises(NeuliteError, match=f"malformed task: plan-{field} must be {kind}"):
            decode_task(record)
    record = encode_task(task, 0)
    record.config_records["config"]["plan-kept_segments"] = -1
    with pytest.raises(NeuliteError, match="-1 segments kept"):
        decode_task(record)
