"""The clients' optimiser: torch.optim.SGD's update bit for bit; and neither a client's training
nor a server's estimate imports torch's compiler into their process."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neulite.config import load_config
from neulite.optim import SGD
from neulite.simulation import Simulation

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-4, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 5e-4, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_sgd_is_torchs_sgd_bit_for_bit(lr: float, momentum: float, weight_decay: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    ours, theirs = ([p.clone().requires_grad_() for p in start] for _ in range(2))
    optimizers = (
        SGD(ours, lr=lr, momentum=momentum, weight_decay=weight_decay),
        torch.optim.SGD(theirs, lr=lr, momentum=momentum, weight_decay=weight_decay),
    )
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator) for p in start]
        for params, optimizer in zip((ours, theirs), optimizers, strict=True):
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = None if (step, i) == (1, 1) else g.clone()  # a parameter the step did not reach
            optimizer.step()
            optimizer.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert all(p.grad is None for p in ours)


CLIENT_THEN_SERVER = """
import pickle, sys
from neulite.federation import load_node
cfg, cid, task = pickle.load(sys.stdin.buffer)
node = load_node(cfg, cid)
result = node.method.client_update(task, node.train, augment=node.augment)
compiler = lambda: sorted({"torch._dynamo", "sympy"} & set(sys.modules))
print(result.num_examples, compiler())
from neulite.algorithms.local import cross_entropy_loss
from neulite.memory import estimate
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
net = StageNet(build_model("small_cnn", (1, 28, 28), 10))
print(estimate(net, net.full_plan(), 32, cross_entropy_loss).total > 0, compiler())
"""


def test_a_clients_training_and_a_servers_estimate_run_without_importing_torchs_compiler():
    """What a Flower node's process does with a training message (load its shard, build the
    meta-device skeleton, train), then what a server does to plan (estimate a step). torch.optim's
    first step, and torch's wrapper of the estimate's dispatch mode, imported the compiler there
    (3.5 s and 71 MiB of a process)."""
    cfg = load_config(overrides=["data.train_size=400", "data.num_clients=2", "clients.per_round=2"])
    sim = Simulation(cfg)
    cid, task = next(iter(sim.server.configure(1).tasks.items()))
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_THEN_SERVER],
        input=pickle.dumps((sim.node_cfg, cid, task)),
        capture_output=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [f"{len(sim.clients[cid].train)} []", "True []"]
