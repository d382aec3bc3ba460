"""Elastic NeuLite: a client whose budget fits more trains the next blocks with its stage's block (a
forward window) or the frozen blocks before it (a backward window), and the server merges each
tensor over the clients that trained it."""

import dataclasses

import pytest
import torch

from neulite.algorithms.evaluate import evaluate
from neulite.algorithms.merge import merge_results
from neulite.algorithms.neulite import NeuLite
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.models.stage_net import StageNet, StagePlan
from neulite.models.zoo import build_model
from neulite.simulation import Simulation, run_experiment

DIGITS = ["data.name=digits", "data.num_clients=6", "train.local_epochs=1", "model.width=0.5"]


def _net() -> StageNet:
    return StageNet(build_model("small_cnn", (1, 28, 28), 10))


def _starting(names: list[str], *prefixes: str) -> bool:
    return any(n.startswith(prefixes) for n in names)


def test_a_window_trains_the_next_blocks_with_the_last_blocks_output_module():
    net = _net()
    wide = dataclasses.replace(net.plan(1, harmonize=True, mentor=True), window=2)
    up = net.up_names(wide)
    assert _starting(up, "model.blocks.0") and _starting(up, "model.blocks.1")
    assert _starting(up, "outputs.1") and _starting(up, "projections.1")
    assert not _starting(up, "outputs.0", "projections.0", "model.blocks.2", "model.head")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        _, logits = net.stage_forward(x, wide)
        blocks = net.model.blocks
        assert torch.equal(logits, net.outputs[1](blocks[1](blocks[0](x)))[1])  # Op_2 after block 2
    to_the_end = dataclasses.replace(net.plan(2, harmonize=True, mentor=True), window=2)
    up = net.up_names(to_the_end)
    assert _starting(up, "model.blocks.1", "model.blocks.2", "model.head", "projections.2")
    assert _starting(up, "model.blocks.0.layer1.1")  # the Harmonizer's tail of the block before the window
    assert not _starting(up, "outputs", "projections.1")
    assert set(net.down_names(to_the_end)) >= set(net.state_names(("model.blocks.0",)))


def test_a_backward_window_trains_the_blocks_before_the_stage_with_the_harmonizer_one_further_back():
    net = _net()
    back = dataclasses.replace(net.plan(3, harmonize=True, mentor=True), reach=1)
    assert (back.first, back.last, net.frozen_depth(back)) == (2, 3, 0)
    up = net.up_names(back)
    assert set(net.state_names(("model.blocks.1", "model.blocks.2", "model.head"))) <= set(up)
    assert _starting(up, "model.blocks.0.layer1.1") and not _starting(up, "model.blocks.0.layer1.0")
    assert not _starting(up, "outputs", "projections.0", "projections.1")
    params = net.prepare(back)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    torch.nn.functional.cross_entropy(net.stage_forward(x, back)[1], y).backward()
    block2 = list(net.model.blocks[1].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block2)
    assert {id(p) for p in block2} <= {id(p) for p in params}
    everything = dataclasses.replace(net.plan(3, harmonize=True), reach=2)
    assert net.frozen_depth(everything) == 0 and _starting(net.up_names(everything), "model.blocks.0.stem")
    assert net.down_names(everything) == net.up_names(everything)


@pytest.mark.parametrize(
    ("stage", "window", "reach"),
    [(2, 3, 0), (3, 2, 0), (1, 0, 0), (0, 2, 0), (4, 1, 0), (1, 1, 1), (3, 1, 3), (2, 1, -1)],
)
def test_a_plan_beyond_the_model_is_refused(stage: int, window: int, reach: int):
    with pytest.raises(NeuliteError, match="bad stage plan"):
        StagePlan(stage, 3, window=window, reach=reach)


def _elastic(max_window: int, direction: str = "forward") -> NeuLite:
    cfg = load_config(
        overrides=[
            "method.name=neulite",
            f"method.neulite.max_window={max_window}",
            f"method.neulite.window_direction={direction}",
        ]
    )
    return NeuLite(_net(), cfg)


def test_each_budget_gets_the_widest_window_it_fits():
    method = _elastic(0)
    plan = method.plan(1)
    peaks = [method.memory(p).total for p in (plan, *method.windows(plan))]
    assert peaks[0] < peaks[1] < peaks[2]
    assert [method.assign(plan, b) for b in (peaks[2], peaks[1], peaks[0], peaks[0] - 1)] == [2, 1, 0, None]
    task = method.configure_train(1, plan, 1, seed=0)
    assert task.plan.window == 2 and set(task.arrays) == set(method.net.down_names(task.plan))
    assert method.windows(method.plan(method.stage_rounds[0] + method.stage_rounds[1] + 1)) == []  # the last stage
    assert _elastic(2).assign(plan, peaks[2]) == 1  # max_window caps it
    assert _elastic(1).assign(plan, peaks[2]) == 0  # the paper's NeuLite


def test_a_backward_window_reaches_as_far_back_as_the_budget_fits():
    method = _elastic(0, "backward")
    assert method.windows(method.plan(1)) == []  # nothing before the first block
    plan = method.plan(method.stage_rounds[0] + method.stage_rounds[1] + 1)
    wider = method.windows(plan)
    assert [(p.stage, p.reach) for p in wider] == [(3, 1), (3, 2)]
    peaks = [method.memory(p).total for p in (plan, *wider)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert [method.assign(plan, b) for b in (peaks[2], peaks[1], peaks[0], peaks[0] - 1)] == [2, 1, 0, None]
    assert method.configure_train(1, plan, 2, seed=0).plan.reach == 2
    assert _elastic(2, "backward").windows(plan) == wider[:1]
    load_config(
        overrides=[
            "method.neulite.max_window=0",
            "method.neulite.window_direction=backward",
            "method.neulite.inherit_outputs=true",
        ]
    )


def test_a_wider_window_and_inherited_outputs_exclude_each_other():
    with pytest.raises(NeuliteError, match="inherit_outputs"):
        load_config(overrides=["method.neulite.max_window=0", "method.neulite.inherit_outputs=true"])


@pytest.mark.parametrize(("variant", "stage"), [("neulite-elastic", 1), ("neulite-elastic-backward", 2)])
def test_an_elastic_round_merges_each_tensor_over_the_clients_that_trained_it(variant: str, stage: int):
    sim = Simulation(
        load_config(overrides=[*DIGITS, f"method.name={variant}", "clients.per_round=6", "method.rounds=3"])
    )
    replies = {}
    honest = sim.train

    def train(cid, task):
        replies[cid] = (task.plan.first != task.plan.last, honest(cid, task))
        return replies[cid][1]

    sim.train = train
    sim.run_round(stage)
    assert {wide for wide, _ in replies.values()} == {False, True}  # the budgets give both kinds of client
    state = sim.method.net.state_dict()
    for name, expected in merge_results([r for _, r in replies.values()], sim.cfg.server).items():
        assert torch.equal(state[name], expected), name
    rows = {r["label"]: r["clients_fit"] for r in sim.server.memory_rows()}  # the run's summary: who fits what
    if variant == "neulite-elastic":
        assert rows["stage 1"] >= rows["stage 1, blocks 1-2"] >= rows["stage 1, blocks 1-3"] >= 1
        assert rows["stage 2"] >= rows["stage 2, blocks 2-3"] and "stage 3, blocks 3-3" not in rows
    else:
        assert rows["stage 2"] >= rows["stage 2, blocks 1-2"] >= 1 and "stage 1, blocks 1-1" not in rows
        assert rows["stage 3"] >= rows["stage 3, blocks 2-3"] >= rows["stage 3, blocks 1-3"]
    extra = "model.blocks.1." if variant == "neulite-elastic" else "model.blocks.0.stem"
    wide = [r for w, r in replies.values() if w]
    extra_names = [n for n in wide[0].arrays if n.startswith(extra)]
    assert extra_names and all(n not in r.arrays for w, r in replies.values() if not w for n in extra_names)


def test_neulite_elastic_learns(tmp_path):
    summary = run_experiment(
        load_config(overrides=[*DIGITS, "method.name=neulite-elastic", "clients.per_round=4", "method.rounds=6"]),
        tmp_path / "run",
    )
    assert summary["final_accuracy"] > 0.3  # chance is 0.1
    windows = [r["estimated_bytes"] for r in summary["stages"] if "blocks" in r["label"]]
    stages = [
        r["estimated_bytes"] for r in summary["stages"] if r["label"].startswith("stage") and "blocks" not in r["label"]
    ]
    assert summary["peak_memory_bytes"] == max(windows) > max(stages)  # a client's peak is its window's


@pytest.mark.parametrize("variant", ["neulite-elastic", "neulite"])
def test_a_round_shows_the_deepest_exit_a_client_has_trained(variant: str):
    """Elastic NeuLite's widest window trains the whole network in stage 1: the server holds it, and
    shows it (as DepthFL shows its deepest exit); plain NeuLite shows the stage's exit."""
    overrides = [*DIGITS, f"method.name={variant}", "clients.per_round=6", "method.rounds=3"]
    sim = Simulation(load_config(overrides=overrides))
    sim.run_round(1)
    method, plan, test = sim.method, sim.method.plan(1), sim.splits.test
    full, exit_ = evaluate(method.net, method.net.full_plan(), test), evaluate(method.net, plan, test)
    assert full != exit_
    assert method.evaluate(plan, test) == (full if variant == "neulite-elastic" else exit_)
    restarted = Simulation(load_config(overrides=overrides)).method  # a resumed run: state from the checkpoint
    restarted.net.load_state_dict(method.net.state_dict())
    restarted.load_state_dict(method.state_dict())
    assert restarted.evaluate(plan, test) == method.evaluate(plan, test)
