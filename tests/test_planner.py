"""`neulite plan`: the fewest memory-balanced blocks that let a target share of clients fit every
stage, checked against peaks computed here, stage by stage, for budgets placed around them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from neulite.algorithms.neulite import NeuLite
from neulite.algorithms.registry import build_method
from neulite.cli import main
from neulite.config import Config, ModelConfig, TrainConfig, load_config
from neulite.errors import NeuliteError
from neulite.experiment import build_experiment
from neulite.federation import simulated_budgets
from neulite.memory import MIB
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.planner import plan_blocks
from neulite.simulation import run_experiment

flower_server = pytest.importorskip("neulite.flower.server_app")
check_planned_budgets = flower_server.check_planned_budgets

SHAPE = (1, 12, 12)
pytestmark = pytest.mark.xdist_group("planner")  # one worker computes the plans' estimates once, not each worker


def _peaks(blocks: int, recompute: bool) -> list[int]:
    """Each stage's peak with `blocks` blocks (0: the network's own), computed here from NeuLite's own stage
    estimates; with `recompute`, the lesser of the two (recomputing a small last stage can cost more)."""
    cfg = Config(model=ModelConfig(name="small_cnn", width=0.5, blocks=blocks), train=TrainConfig(batch_size=16))
    method = build_method(cfg, StageNet(build_model("small_cnn", SHAPE, 10, 0.5, blocks)))
    peaks = [(method.memory(p).total, method.memory(method.recomputing(p)).total) for p in method.plans()]
    return [min(plain, rc) if recompute else plain for plain, rc in peaks]


def _worst(blocks: int, recompute: bool) -> int:
    return max(_peaks(blocks, recompute))


def _plan(budgets: list[int], **kwargs):
    return plan_blocks("small_cnn", SHAPE, 10, budgets, width=0.5, batch_size=16, max_blocks=3, **kwargs)


def test_the_fewest_blocks_that_let_the_target_share_fit_every_stage():
    two, own, three = _worst(2, recompute=False), _worst(0, recompute=False), _worst(3, recompute=False)
    assert three < own < two  # the premise: small_cnn's own 3 blocks, then 3 balanced ones, are cheaper than 2
    rich = [10 * two]
    chosen, candidates, _ = _plan(
        [(two + own) // 2] * 9 + rich, target=0.9, recompute=False
    )  # 9 of 10 fit 3 blocks, not 2
    assert [(c.blocks, c.balanced) for c in candidates] == [(2, True), (3, False)]  # own first among equals
    assert (chosen.blocks, chosen.balanced, chosen.config_blocks, chosen.share) == (3, False, 0, 1.0)
    assert candidates[0].share == 0.1 and len(chosen.cuts) == 2
    chosen, candidates, _ = _plan(
        [(own + three) // 2] * 9 + rich, target=0.9, recompute=False
    )  # only the balanced 3 fit them
    assert [(c.blocks, c.balanced) for c in candidates] == [(2, True), (3, False), (3, True)]
    assert (chosen.blocks, chosen.balanced, chosen.config_blocks) == (3, True, 3)
    assert (
        _plan([(two + own) // 2] * 9 + rich, target=0.1, recompute=False)[0].blocks == 2
    )  # one in ten fits 2 blocks: enough


def test_the_planner_says_which_candidate_and_stage_it_is_estimating():
    steps: list[str] = []
    chosen, candidates, _ = _plan([1], target=1.0, recompute=False, progress=steps.append)  # none fits: all tried
    kinds = {True: "memory-balanced", False: "the network's own"}
    expected = [
        f"candidate {i} of 3, {c.blocks} {kinds[c.balanced]} blocks: stage {s} of {c.blocks}"
        for i, c in enumerate(candidates, 1)
        for s in range(1, c.blocks + 1)
    ]
    assert steps == expected and len(candidates) == 3


def test_a_plan_without_recomputation_never_searches_for_ways_to_recompute(monkeypatch):
    """A run with train.recompute = "off" plans blocks without the search that is most of a large
    network's planning time; its plans record no recomputing peaks."""

    def refuse(self, plan):
        raise AssertionError("searched for ways to recompute")

    monkeypatch.setattr(NeuLite, "recomputing", refuse)
    chosen, candidates, _ = _plan([10**9], target=0.9, recompute=False)
    assert all(c.recompute_peaks is None for c in candidates) and chosen.share == 1.0


def test_when_no_plan_reaches_the_target_the_most_clients_take_part():
    cheapest = {b: min(_peaks(b, recompute=True)) for b in (2, 0, 3)}  # in the planner's order
    poor = min(cheapest.values())  # fits the cheapest stage of some plans only
    budgets = [10 * _worst(2, recompute=True)] * 5 + [poor]
    chosen, candidates, _ = _plan(budgets, target=1.0)
    assert all(c.share < 1.0 for c in candidates)
    assert [c.take_part for c in candidates] == [1.0 if cheapest[b] <= poor else 5 / 6 for b in (2, 0, 3)]
    first = next(b for b in (2, 0, 3) if cheapest[b] <= poor)
    assert chosen.config_blocks == first and chosen.take_part == 1.0


def test_recomputation_is_counted_only_when_allowed():
    plain, recomputed = _worst(3, recompute=False), _worst(3, recompute=True)
    assert recomputed < plain
    budgets = [(plain + recomputed) // 2] * 4
    assert _plan(budgets, target=1.0)[0].share == 1.0
    without = _plan(budgets, target=1.0, recompute=False)[0]
    assert without.share < 1.0  # not even the most blocks tried fit everyone without recomputing


def test_bad_plans_are_refused_and_the_command_prints_the_contract(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(NeuliteError, match="at least one client budget"):
        _plan([])
    with pytest.raises(NeuliteError, match="target share"):
        _plan([MIB], target=1.5)
    argv = ["plan", "--model", "small_cnn", "--input-shape", "1,12,12", "--width", "0.5", "--batch-size", "16"]
    assert main([*argv, "--budgets", "50,60", "--max-blocks", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chosen"]["blocks"] == 2 and report["chosen"]["share"] == 1.0 and report["full_bytes"] > 0
    assert main([*argv, "--budgets", "5,x"]) == 2
    assert "--budgets must be MiB values" in capsys.readouterr().err


AUTO = [
    "model.blocks=auto",
    "data.name=digits",
    "model.width=0.5",
    "data.num_clients=6",
    "clients.per_round=3",
    "method.rounds=3",
    "train.local_epochs=1",
    "train.batch_size=16",
]


def test_a_run_with_auto_blocks_trains_and_records_the_planners_choice(tmp_path):
    cfg = load_config(overrides=AUTO)
    summary = run_experiment(cfg, tmp_path)
    experiment = build_experiment(cfg)
    whole = build_experiment(load_config(overrides=[*AUTO, "model.blocks=0"]))
    budgets = simulated_budgets(cfg, whole.full_peak)
    chosen, _, _ = plan_blocks(
        "small_cnn", (1, 8, 8), 10, budgets, width=0.5, batch_size=16, target=0.9, recompute=False, max_blocks=3
    )
    assert summary["block_plan"] == dataclasses.asdict(chosen)
    assert experiment.cfg.model.blocks == chosen.config_blocks
    assert len(experiment.method.net.model.blocks) == chosen.blocks
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {k.split(".")[1] for k in state if k.startswith("blocks.")} == {str(i) for i in range(chosen.blocks)}
    assert load_config(tmp_path / "config.toml").model.blocks == "auto"  # resumes by planning again


@pytest.mark.parametrize(
    "override, fragment", [("model.blocks=many", "model.blocks"), ("model.plan_share=0", "plan_share")]
)
def test_bad_block_settings_are_refused_by_name(override: str, fragment: str):
    with pytest.raises(NeuliteError, match=fragment):
        load_config(overrides=[override])


def test_flower_nodes_with_budgets_of_their_own_are_told_how_to_plan_for_them():
    experiment = build_experiment(load_config(overrides=AUTO))
    simulated = simulated_budgets(experiment.cfg, experiment.full_peak)
    check_planned_budgets(experiment, dict(enumerate(simulated)))  # the budgets it planned for: fine
    with pytest.raises(NeuliteError, match=r"neulite plan --model small_cnn .*--budgets 1\.0,"):
        check_planned_budgets(experiment, {0: MIB, **{cid: b for cid, b in enumerate(simulated) if cid}})
