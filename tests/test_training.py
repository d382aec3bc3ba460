import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch

from neulite.algorithms.local import local_update
from neulite.algorithms.merge import merge_results
from neulite.algorithms.neulite import DEFAULT_LAMBDA1, DEFAULT_LAMBDA2, curriculum, neulite_loss, stage_round_budget
from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.config import ServerConfig, TrainConfig, load_config
from neulite.data import TensorDataset
from neulite.errors import NeuliteError
from neulite.models.arrays import assign_arrays, nbytes
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.simulation import Simulation

SMALL = [
    "method.name=neulite",
    "data.num_clients=6",
    "clients.per_round=3",
    "train.local_epochs=1",
    "method.rounds=3",
    "data.train_size=1000",
]


def _data(n: int = 64) -> TensorDataset:
    return TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)), 10)


@pytest.mark.parametrize("harmonize", [True, False])
def test_a_stage_round_leaves_frozen_state_bit_identical(harmonize: bool):
    net = StageNet(build_model("small_cnn", (1, 28, 28), 10))
    plan = net.plan(2, harmonize=harmonize, mentor=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = ClientTask(1, plan, {n: net.state_dict()[n] for n in net.down_names(plan)}, seed=1)
    client = copy.deepcopy(net).to("meta")
    loss = functools.partial(neulite_loss, lambda1=0.3, lambda2=0.3, sigma=5.0)
    result = local_update(client, task, _data(), TrainConfig(batch_size=16), augment=False, loss=loss)
    after = client.state_dict()
    trained = set(result.arrays)
    assert trained == set(net.up_names(plan))
    for name in net.down_names(plan):
        if name not in trained:
            assert torch.equal(after[name], before[name]), f"{name} changed although frozen"
    assert any(not torch.equal(after[n], before[n]) for n in trained if "block" in n)
    tail = "model.blocks.0.layer1.1.conv2.weight"
    assert (tail in trained) == harmonize
    assert nbytes(result.arrays) < nbytes(task.arrays)


def test_malformed_payload_is_rejected():
    net = StageNet(build_model("small_cnn", (1, 28, 28), 10))
    with pytest.raises(NeuliteError, match="unknown tensor"):
        assign_arrays(net, {"nope": torch.zeros(1)})
    with pytest.raises(NeuliteError, match="has shape"):
        assign_arrays(net, {"model.head.fc.bias": torch.zeros(3)})


def test_weighted_average_uses_data_sizes_and_never_averages_counters():
    a = ClientResult({"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}, 1)
    b = ClientResult({"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(7)}, 3)
    out = merge_results([a, b], ServerConfig())
    assert torch.allclose(out["w"], torch.tensor([3.0, 7.0]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 7


def test_curriculum_and_stage_budgets():
    assert curriculum(DEFAULT_LAMBDA1, 4) == DEFAULT_LAMBDA1
    assert curriculum(DEFAULT_LAMBDA2, 3) == (0.1, 0.4, 0.5)
    assert stage_round_budget(10, [1, 1, 1]) == [4, 3, 3]  # a tie: the spare round goes to the earliest stage
    assert stage_round_budget(17, [1, 5, 20, 2]) == [2, 3, 10, 2]  # 13 spare rounds by weight, largest remainders first
    assert stage_round_budget(4, [1, 100, 1, 1]) == [1, 1, 1, 1]  # at least one round each
    with pytest.raises(NeuliteError, match="fewer than"):
        stage_round_budget(2, [1, 1, 1])


def test_sequential_and_cyclic_schedules():
    seq = Simulation(load_config(overrides=[*SMALL, "method.neulite.stage_rounds=[2, 1, 3]", "method.rounds=6"]))
    assert [seq.method.plan(r).stage for r in range(1, 7)] == [1, 1, 2, 3, 3, 3]
    cyc = Simulation(load_config(overrides=[*SMALL, "method.name=neulite-cyclic", "method.rounds=6"]))
    assert [cyc.method.plan(r).stage for r in range(1, 7)] == [1, 2, 3, 1, 2, 3]


def test_eligibility_follows_budgets_and_infeasible_budgets_fail_early():
    sim = Simulation(load_config(overrides=SMALL))
    for plan in sim.method.plans():
        peak = sim.method.memory(plan).total
        assert {cid for cid, _ in sim.server.eligible(plan)} == {c.cid for c in sim.clients if c.budget >= peak}
    oracle = Simulation(load_config(overrides=[*SMALL, "method.name=fedavg", "clients.fractions=[0.1, 0.2]"]))
    assert len(oracle.server.eligible(oracle.method.plan(1))) == 6
    with pytest.raises(NeuliteError, match="budget no stage fits: full-model training"):
        Simulation(load_config(overrides=[*SMALL, "method.name=exclusivefl", "clients.fractions=[0.1, 0.9]"]))
    with pytest.raises(NeuliteError, match="budget no stage fits: stage 1"):
        Simulation(load_config(overrides=[*SMALL, "clients.budget=uniform", "clients.budget_mb=[1, 2]"]))


def test_clients_are_index_views_into_one_training_set():
    sim = Simulation(load_config(overrides=SMALL))
    held = sim.splits.train
    for client in sim.clients:
        assert client.data is held  # no copy of a shard is kept: the federation's size does not multiply the data
        assert torch.equal(client.train.x, held.x[client.train_indices])
        assert torch.equal(client.val.y, held.y[client.val_indices])
    shards = np.concatenate([np.concatenate([c.train_indices, c.val_indices]) for c in sim.clients])
    assert sorted(shards.tolist()) == list(range(len(held)))  # disjoint, and every sample belongs to a client


@pytest.mark.parametrize("method", ["neulite", "heterofl"])  # heterofl: a prediction depends on its batch
def test_validation_accuracy_is_the_clients_accuracies_weighted_by_their_validation_sizes(method: str):
    sim = Simulation(load_config(overrides=[*SMALL, "clients.fractions=[0.0001, 0.9]", f"method.name={method}"]))
    fitting = sim.server.fitting_clients()
    assert 0 < len(fitting) < len(sim.clients)  # a client that fits no stage is not asked
    task = sim.method.evaluation_task()
    per_client = [(sim.method.client_evaluate(task, sim.clients[c].val)[0], len(sim.clients[c].val)) for c in fitting]
    expected = sum(a * n for a, n in per_client) / sum(n for _, n in per_client)
    assert sim.validation_accuracy() == pytest.approx(expected, abs=1e-6)


def test_a_rounds_sampling_asks_each_budget_once_per_plan(monkeypatch: pytest.MonkeyPatch):
    sim = Simulation(load_config(overrides=[*SMALL, "method.rounds=4", "method.neulite.stage_rounds=[2, 1, 1]"]))
    calls = []
    assign = sim.method.assign
    monkeypatch.setattr(sim.method, "assign", lambda plan, budget: calls.append(plan) or assign(plan, budget))
    sim.server._eligible.clear()
    for rnd in range(1, 5):
        sim.server.configure(rnd)
    assert len(calls) == len(sim.clients) * len({sim.method.plan(r) for r in range(1, 5)})


def _final_state(overrides: list[str]) -> dict[str, torch.Tensor]:
    sim = Simulation(load_config(overrides=overrides))
    for r in range(1, 3):
        sim.run_round(r)
    return sim.method.net.state_dict()


def test_same_seed_same_weights_and_other_seed_differs():
    digits = [*SMALL, "data.name=digits"]
    a, b = _final_state(digits), _final_state(digits)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _final_state([*digits, "seed=1"])
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_round_metrics_and_bytes():
    sim = Simulation(load_config(overrides=SMALL))
    rec = sim.run_round(1)
    plan = sim.method.plan(1)
    state = sim.method.net.state_dict()
    per_client_down = sum(state[n].numel() * state[n].element_size() for n in sim.method.net.down_names(plan))
    per_client_up = sum(state[n].numel() * state[n].element_size() for n in sim.method.net.up_names(plan))
    assert rec.bytes_down == rec.participants * per_client_down
    assert rec.bytes_up == rec.participants * per_client_up
    assert rec.participants == min(3, rec.eligible)
    assert 0.0 <= rec.accuracy <= 1.0 and np.isfinite(rec.train_loss)
    assert rec.stage_peak_bytes == sim.method.memory(plan).total
    # clients train one after another here: the slowest one is a real share of the round, not all of it
    assert 0.0 < rec.slowest_client_seconds < rec.wall_seconds


def test_a_stage_trains_with_its_own_learning_rate_and_epochs():
    sim = Simulation(
        load_config(
            overrides=[*SMALL, "method.neulite.stage_lr=[0.2, 0.05, 0.01]", "method.neulite.stage_epochs=[3, 1, 2]"]
        )
    )
    method, client = sim.method, sim.clients[0]
    assert [(method.task_config(p)["lr"], method.task_config(p)["local_epochs"]) for p in method.plans()] == [
        (0.2, 3),
        (0.05, 1),
        (0.01, 2),
    ]
    task = method.configure_train(1, method.plan(1), 0, seed=7)
    trained = method.client_update(task, client.train, augment=False).arrays
    own = dataclasses.replace(sim.cfg.train, lr=0.2, local_epochs=3)
    loss = method.loss(task.config)
    same = local_update(method.client_net(0), task, client.train, own, augment=False, loss=loss).arrays
    other = local_update(method.client_net(0), task, client.train, sim.cfg.train, augment=False, loss=loss).arrays
    assert all(torch.equal(trained[k], same[k]) for k in trained)
    assert any(not torch.equal(trained[k], other[k]) for k in trained if trained[k].is_floating_point())
    assert method.summary()["stage_epochs"] == [3, 1, 2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.neulite.stage_lr=[0.1, 0.1]", "stage_lr needs 3 values"),
        ("method.neulite.stage_epochs=[1, 0, 1]", "stage_epochs entries must be >= 1"),
        ("method.neulite.stage_lr=[0.1, -1, 0.1]", "stage_lr entries must be > 0"),
    ],
)
def test_bad_per_stage_settings_are_named(override: str, message: str):
    with pytest.raises(NeuliteError, match=message):
        Simulation(load_config(overrides=[*SMALL, override]))


@pytest.mark.parametrize(
    "config", [{"lr": "0.1"}, {"local_epochs": 2.5}, {"local_epochs": 0}, {"lr": -1.0}, {"lr": True}]
)
def test_a_malformed_per_stage_setting_in_a_task_is_refused_by_name(config: dict):
    method = Simulation(load_config(overrides=SMALL)).method
    with pytest.raises(NeuliteError, match="malformed task"):
        method.train_config(config)
