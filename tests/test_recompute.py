"""Recomputation inside the trained modules: the same step bit for bit, less memory (estimated as
measured), and with train.recompute = "auto" only the clients that need it recompute."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from neulite.algorithms.neulite import RECOMPUTE, SEGMENTS, WORTH_A_FORWARD, NeuLite, neulite_loss
from neulite.algorithms.registry import build_method
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.memory import measure
from neulite.memory_report import memory_report
from neulite.models.stage_net import StageNet, _segments, frozen_forward
from neulite.models.zoo import build_model


def _net() -> StageNet:
    return StageNet(build_model("small_cnn", (1, 16, 16), 10, 0.5))


@pytest.mark.parametrize(
    ("model", "stage", "segment", "prefix", "drift"),
    [
        *(("small_cnn", s, 0, False, False) for s in (1, 2, 3)),
        ("resnet18", 1, 1, False, False),
        ("resnet18", 2, 2, False, False),
        ("resnet18", 1, 3, False, False),
        ("resnet18", 3, 1, False, False),  # the frozen prefix in micro-batches
        ("resnet18", 3, 0, True, False),  # the frozen prefix re-run in backward
        ("resnet18", 4, 1, True, True),  # ... with its statistics drifting: once, not twice
        ("small_cnn", 3, 0, True, False),
    ],
)
def test_a_recomputed_step_is_the_step_bit_for_bit(model: str, stage: int, segment: int, prefix: bool, drift: bool):
    net = StageNet(build_model(model, (1, 16, 16), 10, 0.25))
    x, y = torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,))  # 40: micro-batches of 16, 16 and 8
    plan = net.plan(stage, harmonize=True, mentor=True, bn_drift=drift)
    steps = []
    for recompute, final in ((False, False), (True, False), (True, True)):
        work = copy.deepcopy(net)
        p = dataclasses.replace(
            plan, recompute=recompute, segment=segment, recompute_prefix=recompute and prefix, recompute_final=final
        )
        params = work.prepare(p)
        loss = neulite_loss(work, p, x, y, lambda1=0.3, lambda2=0.3, sigma=5.0)
        loss.backward()
        steps.append((loss.detach(), [q.grad for q in params], work.state_dict()))
    (loss, grads, state), *recomputing = steps
    for loss_rc, grads_rc, state_rc in recomputing:
        assert torch.equal(loss, loss_rc)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_rc, strict=True))
        assert all(torch.equal(state[k], state_rc[k]) for k in state)  # BatchNorm statistics moved once, not twice


def test_a_recomputed_stage_needs_less_memory_and_the_estimate_holds():
    cfg = load_config(overrides=["train.batch_size=32", "train.recompute=on"])
    net = StageNet(build_model("small_cnn", (1, 28, 28), 10, 1.0))
    method = NeuLite(net, cfg)
    plan = method.plans()[0]
    assert plan.recompute
    plain = method.memory(net.plan(1, harmonize=True, mentor=True)).total
    estimated = method.memory(plan).total
    measured = measure(net, plan, 32, method.loss(method.task_config(plan)))
    assert estimated < 0.95 * plain
    assert abs(estimated - measured) < 0.1 * measured, (estimated, measured)


def test_auto_recomputes_only_for_the_clients_that_need_it():
    cfg = load_config(overrides=["train.recompute=auto"])
    method = build_method(cfg, _net())
    plan = method.plan(1)
    assert not plan.recompute
    needed, reduced = method.memory(plan).total, method.memory(method.recomputing(plan)).total
    assert reduced < needed
    assert method.assign(plan, needed) == 0  # fits as planned: trains at full speed
    assert method.assign(plan, reduced) == RECOMPUTE
    assert method.assign(plan, reduced - 1) is None
    task = method.configure_train(1, plan, RECOMPUTE, seed=0)
    assert task.plan.recompute and task.level == 0  # the same network, told to recompute
    off = build_method(load_config(), _net())
    assert off.assign(off.plan(1), reduced) is None


def test_recomputation_segments_are_the_blocks_units_and_the_leanest_size_is_chosen():
    net = StageNet(build_model("resnet18", (3, 32, 32), 10, 0.25))
    first = net.model.blocks[0]  # Sequential(stem=Sequential(conv, bn, act), layer1=Sequential(unit, unit))
    kinds = [[type(layer).__name__ for layer in run] for run in _segments(first, 1)]
    assert kinds == [["Sequential"], ["BasicBlock"], ["BasicBlock"]]  # the stem's conv, norm and act: one unit
    assert [type(layer).__name__ for layer in _segments(first, 1)[0][0]] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert [len(run) for run in _segments(first)] == [2, 1]  # about √3 runs
    assert _segments(nn.Sequential()) == []
    method = NeuLite(net, load_config(overrides=["train.batch_size=16"]))
    for plan in method.plans():
        chosen = method.recomputing(plan)
        peaks = {
            size: method.memory(dataclasses.replace(plan, recompute=True, segment=size)).total for size in SEGMENTS
        }
        assert chosen.recompute and method.memory(chosen).total <= min(peaks.values())
        assert method.memory(chosen).total < method.memory(plan).total


def test_the_last_segment_runs_once_unless_recomputing_it_is_leaner():
    """Backward begins at the stage's last segment (an output module's, or the last block's before
    the head), so re-running it costs a forward; the estimate says whether it saves memory."""
    net = StageNet(build_model("resnet18", (1, 16, 16), 10, 0.25))
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for stage in (2, net.num_stages):
        plan = dataclasses.replace(net.plan(stage, harmonize=True, mentor=True), recompute=True)
        forwards = []
        for final in (False, True):
            work = copy.deepcopy(net)
            module = work.model.blocks[-1] if stage == net.num_stages else work.outputs[stage - 1]
            calls: list[int] = []
            _segments(module)[-1][-1].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
            p = dataclasses.replace(plan, recompute_final=final)
            work.prepare(p)
            neulite_loss(work, p, x, y, lambda1=0.3, lambda2=0.3, sigma=5.0).backward()
            forwards.append(len(calls))
        assert forwards == [1, 2], stage
    method = NeuLite(net, load_config(overrides=["train.batch_size=16"]))
    for plan in method.plans():
        chosen = method.recomputing(plan)
        other = method.memory(dataclasses.replace(chosen, recompute_final=not chosen.recompute_final)).total
        if chosen.recompute_final:
            assert method.memory(chosen).total < (1 - WORTH_A_FORWARD) * other
        else:
            assert method.memory(chosen).total > (1 - WORTH_A_FORWARD) * other
    with pytest.raises(NeuliteError, match="the last segment is recomputed only by a stage that recomputes"):
        dataclasses.replace(plan, recompute_final=True)


def test_recompute_is_checked_and_refused_where_it_does_not_apply():
    with pytest.raises(NeuliteError, match="train.recompute = .always. is not one of off, on, auto"):
        load_config(overrides=["train.recompute=always"])
    with pytest.raises(NeuliteError, match="train.recompute = 'on' applies to the neulite methods"):
        build_method(load_config(overrides=["train.recompute=on", "method.name=fedavg"]), _net())


def test_the_memory_report_times_each_step_with_and_without_recomputation():
    """benchmarks/memory.py's time-per-step figures: one per row, the recomputed rows their own."""
    plain, recomputed = (
        memory_report("small_cnn", 8, (1, 12, 12), 10, 0.5, with_measurement=False, recompute=r, with_timing=True)
        for r in (False, True)
    )
    for report, recompute in ((plain, False), (recomputed, True)):
        assert report["full"]["step_seconds"] > 0
        assert all(s["recompute"] is recompute and s["step_seconds"] > 0 for s in report["stages"])
    assert "step_seconds" not in memory_report("small_cnn", 8, (1, 12, 12), 10, 0.5, with_measurement=False)["full"]


def test_the_frozen_prefix_in_micro_batches_is_the_whole_batchs_output():
    blocks = StageNet(build_model("resnet18", (3, 16, 16), 10, 0.25)).model.blocks[:2].eval()
    x = torch.randn(37, 3, 16, 16)
    whole = frozen_forward(blocks, x)
    assert torch.equal(frozen_forward(blocks, x, 16), whole)
    assert torch.equal(frozen_forward(blocks, x, 64), whole)
    assert frozen_forward([], x, 16) is x


def test_a_stage_that_recomputes_its_frozen_prefix_keeps_no_prefix_output_and_the_estimate_holds():
    """ResNet-34's third of 8 blocks at 32x32: the frozen prefix's output, at full resolution, is
    as large as what a segment keeps; re-running it from the batch lowers the peak."""
    cfg = load_config(overrides=["train.batch_size=16", "train.recompute=on", "model.name=resnet34", "model.blocks=8"])
    net = StageNet(build_model("resnet34", (3, 32, 32), 10, 0.5, 8))
    method = NeuLite(net, cfg)
    plan = method.recomputing(net.plan(3, harmonize=True, mentor=True))
    assert plan.recompute_prefix
    kept = method.memory(dataclasses.replace(plan, recompute_prefix=False)).total
    estimated = method.memory(plan).total
    measured = measure(net, plan, 16, method.loss(method.task_config(plan)))
    assert estimated < kept
    assert abs(estimated - measured) < 0.1 * measured, (estimated, measured)
    with pytest.raises(NeuliteError, match="the frozen prefix or the last segment is recomputed only by a stage"):
        dataclasses.replace(plan, recompute=False)
