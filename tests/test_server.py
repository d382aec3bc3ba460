"""The server's side of a round, shared by both drivers: eligibility from reported budgets,
sampling, and the minimum number of usable replies."""

import copy
from collections.abc import Callable

import pytest
import torch

from neulite.algorithms.payload import ClientResult
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.experiment import build_experiment
from neulite.server import Round, Server
from neulite.simulation import Simulation


def _server(budgets_of_full: dict[int, float], *overrides: str) -> Server:
    cfg = load_config(
        overrides=["method.name=neulite", "data.num_clients=4", "clients.per_round=4", "method.rounds=3", *overrides]
    )
    experiment = build_experiment(cfg)
    full = experiment.full_peak
    budgets = {cid: int(f * full) for cid, f in budgets_of_full.items()}
    return Server(experiment.method, budgets, cfg, full, lambda task: {}, experiment.partition_sizes)


def test_a_node_that_fits_no_stage_is_never_sent_work():
    server = _server({0: 0.05, 1: 0.5, 2: 0.9, 3: 1.2})
    assert server.fitting_clients() == [1, 2, 3]
    sent = {cid for rnd in (1, 2, 3) for cid in server.configure(rnd).tasks}
    assert 0 not in sent and sent == {1, 2, 3}
    peaks = {p.stage: server.method.memory(p).total for p in server.method.plans()}
    for rnd in (1, 2, 3):
        for cid, _ in server.eligible(server.method.plan(rnd)):
            assert server.budgets[cid] >= peaks[rnd]


def test_no_stage_fits_is_an_error_before_training():
    with pytest.raises(NeuliteError, match="budget no stage fits: stage 1 needs"):
        _server({0: 0.05, 1: 0.5}).check_feasible()


def test_with_recomputation_a_stage_names_the_least_a_client_needs_and_who_fits_only_so():
    poor = _server({0: 0.05, 1: 0.3}, "train.recompute=auto")
    plan = poor.method.plan(1)
    leanest = poor.method.memory(poor.method.recomputing(plan)).total
    full = poor.full_peak
    with pytest.raises(NeuliteError, match=f"stage 1, recomputing, needs {leanest / 2**20:.1f} MiB"):
        poor.check_feasible()
    between = (leanest + poor.method.memory(plan).total) / 2 / full  # fits stage 1 only by recomputing
    rows = {r["label"]: r["clients_fit"] for r in _server({0: between, 1: 1.2}, "train.recompute=auto").memory_rows()}
    assert rows["stage 1"] == 1 and rows["stage 1, recomputing"] == 2


def test_a_round_counts_the_clients_that_took_part_only_by_recomputing():
    cfg = load_config(
        overrides=[
            "method.name=neulite",
            "train.recompute=auto",
            "data.num_clients=4",
            "clients.per_round=4",
            "clients.fractions=[0.5, 0.7]",  # stage 1 plainly needs 0.75 of full-model training
            "data.train_size=400",
            "train.local_epochs=1",
        ]
    )
    sim = Simulation(cfg)
    record = sim.run_round(1)
    assert record.participants == 4 and record.recomputing == 4
    last = sim.run_round(cfg.method.rounds)  # the last stage fits every budget as planned
    assert last.participants == 4 and last.recomputing == 0


def test_too_few_usable_replies_stop_the_round_with_a_clear_message():
    sim = Simulation(
        load_config(
            overrides=[
                "data.num_clients=4",
                "clients.per_round=4",
                "method.rounds=3",
                "clients.min_replies=3",
                "clients.fractions=[1.2, 1.3]",
                "data.train_size=400",
                "train.local_epochs=1",
            ]
        )
    )
    configured = sim.server.configure(1)
    three = {
        cid: sim.method.client_update(task, sim.clients[cid].train, augment=False)
        for cid, task in list(configured.tasks.items())[:3]
    }
    two = dict(list(three.items())[:2])
    with pytest.raises(
        NeuliteError, match="2 of 4 sampled clients returned a usable result, fewer than clients.min_replies=3"
    ):
        sim.server.aggregate(configured, two, sim.splits.test)
    assert sim.server.aggregate(configured, three, sim.splits.test).participants == 3


def _perturb(module: torch.nn.Module) -> None:
    """Stand in for a stage's training: move every parameter somewhere new."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("inherit", [True, False])
def test_a_new_stage_starts_from_the_output_module_that_stood_in_for_it(inherit: bool):
    server = _server({0: 1.2, 1: 1.2}, f"method.neulite.inherit_outputs={str(inherit).lower()}")
    net = server.method.net
    server.configure(1)
    _perturb(net.outputs[0])
    server.configure(2)
    assert _same(net.outputs[1].layers[0], net.outputs[0].layers[1]) is inherit
    assert _same(net.outputs[1].head, net.outputs[0].head) is inherit
    _perturb(net.outputs[1])
    server.configure(3)
    assert _same(net.model.head, net.outputs[1].head) is inherit


def test_a_resumed_stage_is_not_warm_started_again():
    server = _server({0: 1.2, 1: 1.2}, "method.neulite.inherit_outputs=true", "method.rounds=6")
    net = server.method.net
    for rnd in (1, 2, 3):
        server.configure(rnd)
        _perturb(net.outputs[0] if rnd < 3 else net.outputs[1])
    trained = copy.deepcopy(net.outputs[1].state_dict())
    resumed = _server({0: 1.2, 1: 1.2}, "method.neulite.inherit_outputs=true", "method.rounds=6")
    resumed.load_state_dict(server.state_dict())
    resumed.configure(4)
    assert all(torch.equal(v, trained[k]) for k, v in resumed.method.net.outputs[1].state_dict().items())


def _replier(server: Server, configured: Round) -> Callable[[int, float], ClientResult]:
    """`reply(cid, step)`: the tensors client `cid` must return, each floating one moved from what it
    was sent by `step` times standard normal noise (seeded)."""
    generator = torch.Generator().manual_seed(0)

    def reply(cid: int, step: float) -> ClientResult:
        task = configured.tasks[cid]
        arrays = {
            name: task.arrays[name] + step * torch.randn(shape, generator=generator)
            if dtype.is_floating_point
            else task.arrays[name]
            for name, (shape, dtype) in server.method.reply_spec(task).items()
        }
        return ClientResult(arrays, 10)

    return reply


def test_a_client_that_pre_trains_fresh_blocks_is_judged_against_clients_that_did_the_same():
    """Elastic NeuLite: the rich client also trains the next blocks from their initial weights, so
    its update is far larger than that of the clients training stage 1 alone. Judged against their
    median it was left out as an outlier; among its own kind (fewer than three) only the sent
    model's scale bounds it, and a narrow client 10^4 times its peers' update is still left out."""
    cfg = ["method.name=neulite-elastic", "method.neulite.max_window=0"]
    probe = _server({0: 1.2}, *cfg)
    plan = probe.method.plan(1)
    narrow = probe.method.memory(plan).total, probe.method.memory(probe.method.windows(plan)[0]).total
    between = sum(narrow) / 2 / probe.full_peak
    server = _server({0: between, 1: between, 2: between, 3: 1.2}, *cfg)
    configured = server.configure(1)
    reply = _replier(server, configured)
    kinds = {cid: len(server.method.reply_spec(task)) for cid, task in configured.tasks.items()}
    assert kinds[3] > kinds[0] == kinds[1] == kinds[2]  # the rich client trains more
    replies = {0: reply(0, 1e-3), 1: reply(1, 1e-3), 2: reply(2, 2e-3), 3: reply(3, 0.3)}
    assert set(server.accept(configured, replies)) == {0, 1, 2, 3}
    assert set(server.accept(configured, {**replies, 2: reply(2, 10.0)})) == {0, 1, 3}


def test_heterofls_widths_are_judged_together():
    """HeteroFL: a narrow client returns the same tensors, sliced, as the full-width ones; its update
    is judged against their median too, so one far beyond them is left out though no other client
    trains its width."""
    server = _server({0: 1.2, 1: 1.2, 2: 1.2, 3: 0.3}, "method.name=heterofl")
    configured = server.configure(1)
    assert configured.tasks[3].level != configured.tasks[0].level == configured.tasks[1].level
    reply = _replier(server, configured)
    replies = {0: reply(0, 1e-3), 1: reply(1, 1e-3), 2: reply(2, 2e-3), 3: reply(3, 1e-3)}
    assert set(server.accept(configured, replies)) == {0, 1, 2, 3}
    assert set(server.accept(configured, {**replies, 3: reply(3, 0.5)})) == {0, 1, 2}
