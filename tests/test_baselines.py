"""The baseline methods (HeteroFL, FedRolex, DepthFL, ProFL, AllSmall): each one's distinctive mechanism,
and a short run of each through the simulator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neulite.algorithms.allsmall import AllSmall
from neulite.algorithms.depthfl import DepthFL, DepthNet, DepthPlan, depthfl_loss
from neulite.algorithms.fedrolex import FedRolex
from neulite.algorithms.heterofl import HeteroFL, bn_statistics
from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.payload import ClientResult
from neulite.algorithms.profl import ProFL
from neulite.algorithms.registry import build_method
from neulite.algorithms.submodel import WIDTHS, scatter_average, width_net, window
from neulite.config import ServerConfig, load_config
from neulite.data import TensorDataset
from neulite.memory import estimate
from neulite.models.blocks import BlockModel
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.simulation import Simulation


def _small_cnn() -> StageNet:
    return StageNet(build_model("small_cnn", (1, 28, 28), 10))


# ------------------------------------------------------------------------------- HeteroFL / FedRolex


def test_scatter_average_is_per_element_over_the_clients_that_trained_it():
    old = {"w": torch.arange(16.0).view(4, 4), "b": torch.arange(4.0)}
    narrow = ClientResult({"w": torch.full((2, 2), 1.0), "b": torch.full((2,), 1.0)}, num_examples=1)
    wide = ClientResult({"w": torch.full((3, 4), 5.0), "b": torch.full((3,), 5.0)}, num_examples=3)
    merged = scatter_average(old, [narrow, wide], offset=0, rule=ServerConfig())
    expected_w = old["w"].clone()
    expected_w[:3, :] = 5.0  # only the wide client trained these (its second dimension is whole)
    expected_w[:2, :2] = (1.0 * 1 + 5.0 * 3) / 4  # both trained these: data-size weighted
    assert torch.equal(merged["w"], expected_w)  # row 3: nobody trained it, old value kept
    assert torch.equal(merged["b"], torch.tensor([4.0, 4.0, 5.0, 3.0]))


def test_fedrolex_window_rolls_with_the_round_and_wraps():
    assert window(8, 4, 0).tolist() == [0, 1, 2, 3]
    assert window(8, 4, 6).tolist() == [6, 7, 0, 1]
    assert window(8, 8, 5).tolist() == list(range(8))  # an unscaled dimension is whole and in order
    cfg = load_config(overrides=["method.name=fedrolex"])
    rolex, hetero = FedRolex(_small_cnn(), cfg), HeteroFL(_small_cnn(), cfg)
    hetero.net.load_state_dict(rolex.net.state_dict())
    plan = rolex.plan(1)
    state = {k: v.clone() for k, v in rolex.net.state_dict().items()}
    stem, head = "model.blocks.0.stem.conv.weight", "model.head.fc.weight"  # (16, 1, 3, 3) and (10, 64)
    assert torch.equal(hetero.configure_train(14, plan, 1, 0).arrays[stem], state[stem][:8])
    for rnd in (1, 14):
        task = rolex.configure_train(rnd, plan, 1, seed=0)  # level 1: half width
        rows = [(rnd + i) % 16 for i in range(8)]
        assert torch.equal(task.arrays[stem], state[stem][rows])  # image channels (dim 1) whole
        assert torch.equal(task.arrays[head], state[head][:, [(rnd + i) % 64 for i in range(32)]])  # classes whole
    # the round-14 window (wrapping past the end) goes back where it came from
    rolex.aggregate_train(14, plan, [ClientResult({k: v + 1 for k, v in task.arrays.items()}, 10)])
    changed = (rolex.net.state_dict()[stem] != state[stem]).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == sorted(rows)
    assert torch.allclose(rolex.net.state_dict()[stem][rows], state[stem][rows] + 1)


def _calibrate(method: HeteroFL, *datasets: TensorDataset) -> None:
    task = method.calibration_task()
    method.calibrate([method.client_calibrate(task, d) for d in datasets])


def test_heterofl_evaluation_uses_client_data_statistics_and_keeps_batchnorm_static():
    method = HeteroFL(_small_cnn(), load_config(overrides=["method.name=heterofl"]))
    keys = set(method.net.state_dict())
    assert not any("running_" in k for k in keys)
    y = torch.arange(10).repeat_interleave(30)  # class-sorted, like the packaged test split
    data = TensorDataset(torch.randn(300, 1, 28, 28) + y.view(-1, 1, 1, 1) * 0.3, y, 10)
    perm = torch.randperm(300)
    shuffled = TensorDataset(data.x[perm], data.y[perm], 10)
    with pytest.raises(RuntimeError, match="calibrate"):
        method.evaluate(method.final_plan(), data)
    _calibrate(method, shuffled)
    sorted_result = method.evaluate(method.final_plan(), data)
    assert sorted_result == pytest.approx(method.evaluate(method.final_plan(), shuffled))
    other = HeteroFL(_small_cnn(), load_config(overrides=["method.name=heterofl"]))
    other.net.load_state_dict(method.net.state_dict())
    _calibrate(other, TensorDataset(data.x[:30] * 5, data.y[:30], 10))
    assert other.evaluate(other.final_plan(), data) != method.evaluate(method.final_plan(), data), (
        "statistics come from the calibration data"
    )
    assert set(method.net.state_dict()) == keys


def test_heterofl_pools_the_clients_statistics_exactly():
    """Two clients' means and second moments pool to the statistics of their union (checked at the
    first BatchNorm, whose input does not depend on how the data is batched)."""
    method = HeteroFL(_small_cnn(), load_config(overrides=["method.name=heterofl"]))
    x = torch.randn(300, 1, 28, 28) * 2 + 1
    a, b = (
        TensorDataset(x[:100], torch.zeros(100, dtype=torch.long), 10),
        TensorDataset(x[100:], torch.zeros(200, dtype=torch.long), 10),
    )
    _calibrate(method, a, b)
    union = bn_statistics(method.net.model, TensorDataset(x, torch.zeros(300, dtype=torch.long), 10))
    first = "blocks.0.stem.bn"
    for kind in ("mean", "second_moment"):
        assert torch.allclose(method._statistics[f"{first}.{kind}"], union[f"{first}.{kind}"], rtol=1e-4, atol=1e-5)
    spec = method.calibration_spec()
    assert spec[f"{first}.mean"] == ((16,), torch.float32) and len(spec) == len(union)


# ------------------------------------------------------------------------------------------ DepthFL


def test_depthfl_loss_adds_mutual_distillation():
    y = torch.tensor([0, 1, 2, 1])
    agree = torch.randn(4, 3)
    assert float(depthfl_loss([agree, agree.clone()], y, 1.0, 2.0)) == pytest.approx(
        float(depthfl_loss([agree, agree], y, 0.0, 2.0))
    )
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    kl = lambda p, q: (p * (p / q).log()).sum(1).mean()  # noqa: E731  KL(p || q), per-sample mean
    pa, pb = F.softmax(a / 2, 1), F.softmax(b / 2, 1)
    extra = depthfl_loss([a, b], y, 1.0, 2.0) - depthfl_loss([a, b], y, 0.0, 2.0)
    assert float(extra) == pytest.approx(
        float(4 * (kl(pb, pa) + kl(pa, pb))), rel=1e-5
    )  # τ² · Σ_i KL(teacher ‖ student)


def test_depthfl_distillation_changes_the_gradients():
    net = DepthNet(build_model("small_cnn", (1, 28, 28), 10))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    grads = []
    for kd in (0.0, 1.0):
        net.zero_grad()
        depthfl_loss(net.exits(x, 2)[1], y, kd, 1.0).backward()
        grads.append(net.model.blocks[0].stem.conv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    plan = DepthPlan(2, 3)
    assert "outputs.0" in plan.trainable_modules(net) and "outputs.1" in plan.trainable_modules(net)
    assert "model.head" not in plan.trainable_modules(net)


def test_depthfl_assigns_the_deepest_prefix_that_fits():
    method = DepthFL(_small_cnn(), load_config(overrides=["method.name=depthfl"]))
    peaks = [method.memory(method.depth_plan(level)).total for level in range(3)]
    assert peaks[0] > peaks[1] > peaks[2]
    assert method.memory(method.plan(1)).total == peaks[0]
    assert [method.assign(method.plan(1), p) for p in (peaks[0], peaks[1], peaks[2], peaks[2] - 1)] == [0, 1, 2, None]


# --------------------------------------------------------------------------------------------- ProFL


def _profl(rounds: int = 30) -> ProFL:
    blocks = [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32)),
        nn.Sequential(nn.Linear(32, 16), nn.ReLU()),
        nn.Linear(16, 16),
    ]
    net = StageNet(BlockModel(blocks, nn.Linear(16, 10), (1, 8, 8), 10))
    return ProFL(net, load_config(overrides=["method.name=profl", f"method.rounds={rounds}"]))


def _train_to(method: ProFL, theta: torch.Tensor) -> int:
    """One round whose aggregate puts the active block at `theta`; returns the stage it trained."""
    plan = method.plan(0)
    state = method.net.state_dict()
    arrays = {n: state[n].clone() for n in method.net.up_names(plan)}
    prefix = f"model.blocks.{plan.stage - 1}"
    params = list(method.net.get_submodule(prefix).named_parameters())
    for (name, p), part in zip(params, theta.split([p.numel() for _, p in params]), strict=True):
        arrays[f"{prefix}.{name}"] = part.view_as(p)
    method.aggregate_train(0, plan, [ClientResult(arrays, 1)])
    return plan.stage


def _block_vector(method: ProFL) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in method.net.model.blocks[method.stage - 1].parameters()])


def test_profl_advances_when_the_block_jitters_around_a_point():
    method = _profl()
    centre = _block_vector(method)
    jitter = [centre + 0.01 * torch.randn_like(centre) for _ in range(3)]
    assert [_train_to(method, theta) for theta in jitter[:2]] == [1, 1]
    resumed = _profl()  # a checkpoint taken mid-window carries on identically
    resumed.net.load_state_dict(method.net.state_dict())
    resumed.load_state_dict(method.state_dict())
    for m in (method, resumed):
        assert _train_to(m, jitter[2]) == 1
        assert m.plan(4).stage == 2  # EM ≈ 1/(1 + 2√2) < 0.5 after W = 3 rounds


def test_profl_steady_drift_waits_for_the_cap_and_the_run_ends_on_time():
    method = _profl(rounds=30)  # equal share 10: cap 20 rounds, half a share (5) kept for each later stage
    stages = []
    for _ in range(30):
        theta = _block_vector(method)
        stages.append(_train_to(method, theta + 0.01 * torch.ones_like(theta)))  # EM = 1: never converged
    assert stages == [1] * 20 + [2] * 5 + [3] * 5
    assert [(a["after_round"], a["to_stage"], a["why"].split(":")[0]) for a in method.summary()["stage_advances"]] == [
        (0, 2, "cap"),
        (0, 3, "reserve"),
    ]  # `_train_to` numbers every round 0


def test_neulite_adaptive_is_profls_advance_with_the_mentor_and_the_harmonizer():
    blocks = [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32)),
        nn.Sequential(nn.Linear(32, 16), nn.ReLU()),
    ]
    net = StageNet(BlockModel(blocks, nn.Linear(16, 10), (1, 8, 8), 10))
    method = build_method(load_config(overrides=["method.name=neulite-adaptive", "method.rounds=10"]), net)
    assert isinstance(method, ProFL) and method.mentor and method.harmonizer
    plan = method.plan(1)
    assert plan.mentor and plan.harmonize and method.task_config(plan)["lambda2"] > 0
    method.stage = 2
    assert "model.blocks.0.3" in method.plan(1).trainable_modules(net)  # the Harmonizer's tail: block 1's last linear


# ------------------------------------------------------------------------------------------ AllSmall


def _budgets(budgets: list[int]) -> dict[int, int]:
    return dict(enumerate(budgets))


def test_allsmall_takes_the_widest_width_the_weakest_client_fits():
    cfg = load_config(overrides=["method.name=allsmall"])
    net = _small_cnn()
    peaks = {
        w: estimate(m, m.full_plan(), cfg.train.batch_size, cross_entropy_loss).total
        for w in WIDTHS
        for m in [width_net(cfg, net, w)]
    }
    assert peaks[1 / 2] > peaks[1 / 4]
    method = AllSmall(net, cfg)
    method.setup(_budgets([10**12, peaks[1 / 4] + 1, 10**11]))
    assert method.width == 1 / 4 and method.net.model.head.fc.in_features == 16
    level = method.assign(method.plan(1), peaks[1 / 4])
    assert level == WIDTHS.index(1 / 4)  # the level tells a client which width to build
    assert method.client_net(level).model.head.fc.in_features == 16
    method.setup(_budgets([1]))  # nothing fits: the narrowest model, and whoever it does not fit sits out
    assert method.width == 1 / 16
    assert method.assign(method.plan(1), peaks[1 / 16] - 1) is None


# ------------------------------------------------------------------------------------- short runs


@pytest.mark.parametrize("name", ["allsmall", "heterofl", "fedrolex", "depthfl", "profl"])
def test_two_rounds_through_the_simulator(name: str):
    # 3 rounds configured so that ProFL has a round per stage; two are run
    cfg = load_config(
        overrides=[
            f"method.name={name}",
            "data.num_clients=6",
            "clients.per_round=3",
            "method.rounds=3",
            "train.local_epochs=1",
            "data.name=digits",  # 8x8 images: two rounds of each method, not its accuracy
            "model.width=0.5",
        ]
    )
    sim = Simulation(cfg)
    for rnd in (1, 2):
        record = sim.run_round(rnd)
        assert record.participants >= 1
        assert all(math.isfinite(v) for v in (record.accuracy, record.loss, record.train_loss))
    assert all(math.isfinite(v) for v in sim.final_accuracy())
    restored = Simulation(cfg)  # a checkpoint restores into a freshly built federation
    restored.server.load_state_dict(sim.server.state_dict())
    _assert_same(restored.server.state_dict(), sim.server.state_dict())
    assert restored.method.plan(3) == sim.method.plan(3)
    assert restored.final_accuracy() == sim.final_accuracy()


def _assert_same(a, b, path: str = "state") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path
