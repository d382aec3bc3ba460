"""Clients trained side by side in worker processes give the sequential run's replies bit for bit,
and a failing client or a dying worker costs only those clients."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch

from neulite.client_pool import ClientPool
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.simulation import Simulation

SMALL = [  # replies bit for bit and failures are tested, not learning: few samples, split evenly
    "data.name=digits",
    "data.train_size=500",
    "data.partition=iid",
    "data.num_clients=5",
    "clients.per_round=3",
    "method.rounds=3",
    "train.local_epochs=1",
    "model.width=0.5",
    "clients.fractions=[0.5, 1.1]",
]


def _kill(pool: ClientPool) -> None:
    for process in list(pool._executor._processes.values()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


def test_two_workers_give_the_sequential_run_bit_for_bit_and_a_failure_costs_only_its_clients():
    cfg = load_config(overrides=SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers train on one thread each: so does the sequential reference
    try:
        with Simulation(cfg) as sim:
            one = [sim.run_round(rnd) for rnd in (1, 2)]
            state_one = sim.method.net.state_dict()
    finally:
        torch.set_num_threads(threads)
    with Simulation(cfg, workers=2) as sim:
        two = [sim.run_round(rnd) for rnd in (1, 2)]
        assert [(r.stage, r.participants, r.bytes_up, r.accuracy, r.train_loss) for r in two] == [
            (r.stage, r.participants, r.bytes_up, r.accuracy, r.train_loss) for r in one
        ]
        state_two = sim.method.net.state_dict()
        assert all(torch.equal(state_one[k], state_two[k]) for k in state_one)

        assert sim.pool is not None
        tasks = {cid: (task, sim.clients[cid].budget) for cid, task in sim.server.configure(4).tasks.items()}
        done: dict[int, str] = {}
        sim.pool.train({99: next(iter(tasks.values())), **tasks}, lambda cid, r, err: done.setdefault(cid, err))
        assert "IndexError" in done[99] and all(done[cid] == "" for cid in tasks)  # no client 99: only it fails
        done.clear()
        sim.pool.train(tasks, lambda cid, r, err: (done.setdefault(cid, err), _kill(sim.pool)))
        assert set(done) == set(tasks) and any("worker process died" in e for e in done.values())


def test_workers_must_be_a_positive_integer():
    with pytest.raises(NeuliteError, match="workers must be a positive integer, got 0"):
        Simulation(load_config(overrides=SMALL), workers=0)
    with pytest.raises(NeuliteError, match="at least 2 workers"):
        ClientPool(load_config(overrides=SMALL), 1)
