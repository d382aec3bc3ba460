"""Recomputation inside the trained modules: the same step bit for bit, less memory (estimated as
measured), and with train.recompute = "auto" only the clients that need it recompute."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import neulite
from neulite.algorithms.neulite import SEGMENTS, WORTH_A_FORWARD, NeuLite, neulite_loss
from neulite.algorithms.registry import build_method
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.memory import measure
from neulite.memory_report import memory_report, reestimated
from neulite.models.stage_net import StageNet, _segments, frozen_forward
from neulite.models.zoo import build_model


def _net() -> StageNet:
    return StageNet(build_model("small_cnn", (1, 16, 16), 10, 0.5))


RESNET18_8 = pytest.mark.xdist_group("resnet18-in-8-blocks")
"""Tests of ResNet-18 in 8 blocks run on one test worker: its stage estimates, seconds each, are
then computed once (they are cached per process) rather than once per worker."""


@pytest.mark.parametrize(
    ("model", "stage", "segment", "prefix", "drift", "inner"),
    [
        *(("small_cnn", s, 0, False, False, 0) for s in (1, 2, 3)),
        ("resnet18", 1, 1, False, False, 0),
        ("resnet18", 2, 2, False, False, 0),
        ("resnet18", 1, 3, False, False, 0),
        ("resnet18", 3, 1, False, False, 0),  # the frozen prefix in micro-batches
        ("resnet18", 3, 0, True, False, 0),  # the frozen prefix re-run in backward
        ("resnet18", 4, 1, True, True, 0),  # ... with its statistics drifting: once, not twice
        ("small_cnn", 3, 0, True, False, 0),
        ("resnet18", 1, 1, False, False, 0xFFFF),  # the units' first convolutions recomputed once more
        ("resnet18", 3, 0, True, True, 0xFFFF),
        ("resnet18", 1, 1, False, False, 0b101),  # ... in the first and third segments only
    ],
)
def test_a_recomputed_step_is_the_step_bit_for_bit(
    model: str, stage: int, segment: int, prefix: bool, drift: bool, inner: int
):
    net = StageNet(build_model(model, (1, 16, 16), 10, 0.25))
    x, y = torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,))  # 40: micro-batches of 16, 16 and 8
    plan = net.plan(stage, harmonize=True, mentor=True, bn_drift=drift)
    steps = []
    for recompute, kept in ((False, 1), (True, 0), (True, 1), (True, 2), (True, 99)):
        work = copy.deepcopy(net)
        p = dataclasses.replace(
            plan,
            recompute=recompute,
            segment=segment,
            recompute_prefix=recompute and prefix,
            kept_segments=kept,
            recompute_inner=inner if recompute else 0,
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
    level = method.assign(plan, reduced)
    assert method.variants(plan)[level] == method.recomputing(plan)
    assert method.assign(plan, reduced - 1) is None
    task = method.configure_train(1, plan, level, seed=0)
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
    leaner = []
    for plan in method.plans():
        chosen = method.recomputing(plan)
        peaks = {
            size: method.memory(dataclasses.replace(plan, recompute=True, segment=size, kept_segments=0)).total
            for size in SEGMENTS
        }
        if chosen.recompute:
            assert peaks[chosen.segment] == min(peaks.values())
            assert method.memory(chosen).total < (1 - WORTH_A_FORWARD) * method.memory(plan).total
        else:  # a weight-bound stage: no segment size lowers its peak enough to pay for a forward
            assert chosen == plan and min(peaks.values()) >= (1 - WORTH_A_FORWARD) * method.memory(plan).total
        leaner.append(chosen.recompute)
    assert leaner[0] and not leaner[-1]


def test_the_kept_segments_run_once_and_the_others_twice():
    """The last `kept_segments` of a stage's segments, counted back across its modules (the output
    module's, then the blocks'), keep their activations: their layers run once, the others' again
    in backward. A forward-pre-hook on each segment's first layer counts runs (torch may stop a
    recomputation early, after the last tensor it needs, so a forward hook would miss the partial
    run)."""
    net = StageNet(build_model("resnet18", (1, 16, 16), 10, 0.25))
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for stage in (2, net.num_stages):
        plan = dataclasses.replace(net.plan(stage, harmonize=True, mentor=True), recompute=True)
        total = net.segment_count(plan)
        assert total == sum(len(_segments(m)) for m in net.autograd_modules(plan))
        for kept in (0, 1, 2, total):
            work = copy.deepcopy(net)
            runs = [[] for _ in range(total)]
            firsts = [_first_weighted(run[0]) for module in work.autograd_modules(plan) for run in _segments(module)]
            for calls, layer in zip(runs, firsts, strict=True):
                layer.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
            p = dataclasses.replace(plan, kept_segments=kept)
            work.prepare(p)
            # the Harmonizer's block runs from the frozen input: its segments before its trained tail
            # need no gradient, so autograd keeps nothing of them to recompute
            trains = [
                any(q.requires_grad for r in run for q in r.parameters())
                for m in work.autograd_modules(p)
                for run in _segments(m)
            ]
            grads = [any(trains[: i + 1]) for i in range(total)]
            neulite_loss(work, p, x, y, lambda1=0.3, lambda2=0.3, sigma=5.0).backward()
            expected = [2 if g and i < total - kept else 1 for i, g in enumerate(grads)]
            assert [len(c) for c in runs] == expected, (stage, kept)
    with pytest.raises(NeuliteError, match="the last segment are recomputed only by a stage that recomputes"):
        dataclasses.replace(plan, recompute=False, kept_segments=0)


def _first_weighted(unit: nn.Module) -> nn.Module:
    """A unit's first layer with weights of its own (a unit may be a wrapper made for the segment)."""
    return next(m for m in unit.modules() if next(m.parameters(recurse=False), None) is not None)


def test_the_step_counts_each_forward_recomputation_re_runs():
    """The estimate's operation count (`NeuLite.flops`) is the plain step's when every segment keeps
    its activations, grows with the segments recomputed, and grows again where the units' inner
    parts or the frozen prefix re-run too."""
    net = StageNet(build_model("resnet18", (1, 16, 16), 10, 0.25))
    method = NeuLite(net, load_config(overrides=["train.batch_size=16"]))
    plan = net.plan(2, mentor=True)  # without the Harmonizer, whose frozen part re-runs nothing
    recomputing = dataclasses.replace(plan, recompute=True)
    count = net.segment_count(recomputing)
    flops = [method.flops(dataclasses.replace(recomputing, kept_segments=k)) for k in range(count, -1, -1)]
    assert flops[0] == method.flops(plan)
    assert all(a < b for a, b in zip(flops, flops[1:], strict=False))
    everything = dataclasses.replace(recomputing, kept_segments=0)
    for lever, on in (("recompute_inner", (1 << count) - 1), ("recompute_prefix", True)):
        assert method.flops(dataclasses.replace(everything, **{lever: on})) > flops[-1]


@RESNET18_8
def test_no_way_to_recompute_a_stage_beats_its_rungs():
    """ResNet-18 in 8 blocks: each rung costs more operations than the one before and is leaner by
    `WORTH_A_FORWARD`, and every other way to recompute the stage (`recomputations`) is matched by a
    rung as cheap and at most `WORTH_A_FORWARD` above its peak: whatever its budget, a client gets
    the fewest operations that fit it. Where re-running the frozen prefix costs less than re-running
    the units' inner parts, a rung does that alone (a fixed order of levers never offered it)."""
    net = StageNet(build_model("resnet18", (3, 32, 32), 10, 0.25, 8))
    method = NeuLite(net, load_config(overrides=["train.batch_size=8", "model.blocks=8"]))
    prefix_alone = False
    for plan in method.plans()[:4]:
        rungs = method.rungs(plan)
        assert method.recomputing(plan) == (rungs[-1] if rungs else plan)
        peaks, flops = [method.memory(r).total for r in rungs], [method.flops(r) for r in rungs]
        assert all(
            b < (1 - WORTH_A_FORWARD) * a for a, b in zip([method.memory(plan).total, *peaks], peaks, strict=False)
        )
        assert all(a <= b for a, b in zip(flops, flops[1:], strict=False))
        for other in method.recomputations(plan):
            if method.memory(other).total < (1 - WORTH_A_FORWARD) * method.memory(plan).total:
                assert any(
                    method.flops(r) <= method.flops(other)
                    and method.memory(r).total <= method.memory(other).total / (1 - WORTH_A_FORWARD)
                    for r in rungs
                ), other
        prefix_alone |= any(r.recompute_prefix and not r.recompute_inner for r in rungs[:-1])
    assert prefix_alone


@RESNET18_8
def test_a_stage_recomputes_inner_parts_only_in_the_segments_that_keep_its_peak_down():
    """ResNet-18 in 8 blocks: where the inner parts are recomputed, only in some of the recomputed
    segments, and in none the peak could do without by `WORTH_A_FORWARD`."""
    net = StageNet(build_model("resnet18", (3, 32, 32), 10, 0.25, 8))
    method = NeuLite(net, load_config(overrides=["train.batch_size=8", "model.blocks=8"]))
    inner = [chosen for chosen in map(method.recomputing, method.plans()) if chosen.recompute_inner]
    assert inner
    for chosen in inner:
        recomputed = net.segment_count(chosen) - chosen.kept_segments
        every = dataclasses.replace(chosen, recompute_inner=(1 << recomputed) - 1)
        allowed = method.memory(every).total / (1 - WORTH_A_FORWARD)
        assert chosen.recompute_inner < 1 << recomputed
        for bit in range(recomputed):
            if chosen.recompute_inner >> bit & 1:
                fewer = dataclasses.replace(chosen, recompute_inner=chosen.recompute_inner & ~(1 << bit))
                assert method.memory(fewer).total > allowed
    assert any(c.recompute_inner != (1 << net.segment_count(c) - c.kept_segments) - 1 for c in inner)


def test_recompute_is_checked_and_refused_where_it_does_not_apply():
    with pytest.raises(NeuliteError, match="train.recompute = .always. is not one of off, on, auto"):
        load_config(overrides=["train.recompute=always"])
    with pytest.raises(NeuliteError, match="train.recompute = 'on' applies to the neulite methods"):
        build_method(load_config(overrides=["train.recompute=on", "method.name=fedavg"]), _net())


def test_the_memory_report_times_each_step_with_and_without_recomputation():
    """benchmarks/memory.py's time-per-step figures: one per row, the recomputed rows their own, and
    the operations each step takes by the estimate."""
    plain, recomputed = (
        memory_report("small_cnn", 8, (1, 12, 12), 10, 0.5, with_measurement=False, recompute=r, with_timing=True)
        for r in (False, True)
    )
    for report, recompute in ((plain, False), (recomputed, True)):
        assert report["full"]["step_seconds"] > 0
        assert all(s["recompute"] is recompute and s["step_seconds"] > 0 for s in report["stages"])
        assert all(("plain_step_seconds" in s) is recompute for s in report["stages"])  # its twin, timed in turn
        assert all(("plain_estimated_flops" in s) is recompute for s in report["stages"])
    assert all(s["plain_step_seconds"] > 0 for s in recomputed["stages"])
    for s, twin in zip(recomputed["stages"], plain["stages"], strict=True):  # a recomputed forward costs operations
        assert s["plain_estimated_flops"] == twin["estimated_flops"] < s["estimated_flops"]
    assert "step_seconds" not in memory_report("small_cnn", 8, (1, 12, 12), 10, 0.5, with_measurement=False)["full"]


def test_recompute_on_leaves_as_planned_a_stage_it_cannot_make_leaner():
    """A user's VGG-like CNN: its first stage (one convolution) and third gain nothing by
    recomputing, so even train.recompute = "on" trains them as planned, at full speed."""
    net = StageNet(build_model("examples.user_cnns:plain_cnn", (3, 16, 16), 10))
    on, off = (
        build_method(load_config(overrides=[f"train.recompute={mode}", "train.batch_size=16"]), net)
        for mode in ("on", "off")
    )
    for stage, (plan, planned) in enumerate(zip(on.plans(), off.plans(), strict=True), start=1):
        if stage in (1, 3):
            assert plan == planned
        else:
            assert plan.recompute and on.memory(plan).total < (1 - WORTH_A_FORWARD) * off.memory(planned).total


def test_the_memory_report_at_a_budget_gives_each_stage_the_cheapest_plan_that_fits_it():
    """benchmarks/memory.py's "at_budget" rows: small_cnn's first stage (59% of full-model training
    planned) recomputes at a 58% budget, its others (49%, 57%) train as planned; no stage is timed
    against a twin unless it recomputes, and a budget the last stage cannot fit even recomputing is
    refused, naming it."""
    args = ("small_cnn", 8, (1, 12, 12), 10, 0.5)
    report = memory_report(*args, with_measurement=False, budget=0.58, with_timing=True)
    assert report["budget_fraction"] == 0.58
    assert [s["recompute"] for s in report["stages"]] == [True, False, False]
    assert all(s["fraction_of_full"] <= 0.58 for s in report["stages"])
    assert [("plain_step_seconds" in s) for s in report["stages"]] == [True, False, False]
    assert reestimated(report)["stages"] == [{**s, "estimate_error": None} for s in report["stages"]]
    with pytest.raises(NeuliteError, match="stage 3 needs .* MiB even recomputing"):
        memory_report(*args, with_measurement=False, budget=0.5)


def test_the_frozen_prefix_in_micro_batches_is_the_whole_batchs_output():
    blocks = StageNet(build_model("resnet18", (3, 16, 16), 10, 0.25)).model.blocks[:2].eval()
    x = torch.randn(37, 3, 16, 16)
    whole = frozen_forward(blocks, x)
    assert torch.equal(frozen_forward(blocks, x, 16), whole)
    assert torch.equal(frozen_forward(blocks, x, 64), whole)
    assert frozen_forward([], x, 16) is x


@RESNET18_8
@pytest.mark.parametrize(
    ("model", "stage", "lever"), [("resnet34", 3, "recompute_prefix"), ("resnet18", 2, "recompute_inner")]
)
def test_a_lever_the_estimate_chooses_lowers_the_peak_as_measured(model: str, stage: int, lever: str):
    """ResNet-34's third of 8 blocks at 32x32: the frozen prefix's output, at full resolution, is as
    large as what a segment keeps; re-running it from the batch lowers the peak. ResNet-18's second
    of 8 blocks is one residual unit at full resolution: its second forward in backward would hold
    all the unit's activations at once; recomputing its first convolution once more lowers the peak."""
    cfg = load_config(overrides=["train.batch_size=8", "train.recompute=on", f"model.name={model}", "model.blocks=8"])
    net = StageNet(build_model(model, (3, 32, 32), 10, 0.25, 8))
    method = NeuLite(net, cfg)
    plan = method.recomputing(net.plan(stage, harmonize=True, mentor=True))
    assert getattr(plan, lever)
    without = method.memory(dataclasses.replace(plan, **{lever: False})).total
    estimated = method.memory(plan).total
    measured = measure(net, plan, 8, method.loss(method.task_config(plan)))
    assert estimated < (1 - WORTH_A_FORWARD) * without
    assert abs(estimated - measured) < 0.1 * measured, (estimated, measured)
    with pytest.raises(NeuliteError, match="the units. inner parts or the last segment are recomputed only by a stage"):
        dataclasses.replace(plan, recompute=False)


class _UserResidual(nn.Module):
    """A user's residual unit that marks its first convolution `neulite.recomputable`."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = neulite.recomputable(lambda x: torch.relu(self.bn1(self.conv1(x))), x, [self.bn1])
        return torch.relu(x + self.bn2(self.conv2(h)))


def test_a_users_unit_marks_its_own_inner_part_and_the_step_stays_bit_for_bit():
    stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    blocks = [nn.Sequential(stem, _UserResidual(16)), _UserResidual(16), _UserResidual(16)]
    model = neulite.BlockModel(blocks, neulite.ClassifierHead(16, 10), (1, 16, 16), 10)
    net = StageNet(model)
    method = NeuLite(net, load_config(overrides=["train.batch_size=32", "train.recompute=on"]))
    plan = method.recomputing(net.plan(3, harmonize=True, mentor=True))  # one unit: its activations are the peak
    assert plan.recompute_inner
    assert method.memory(plan).total < method.memory(dataclasses.replace(plan, recompute_inner=False)).total
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    steps = []
    for p in (net.plan(3, harmonize=True, mentor=True), plan):
        work = copy.deepcopy(net)
        params = work.prepare(p)
        neulite_loss(work, p, x, y, lambda1=0.3, lambda2=0.3, sigma=5.0).backward()
        steps.append(([q.grad for q in params], work.state_dict()))
    (grads, state), (grads_rc, state_rc) = steps
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_rc, strict=True))
    assert all(torch.equal(state[k], state_rc[k]) for k in state)


@RESNET18_8
def test_a_client_pays_for_as_much_recomputation_as_its_budget_needs():
    """ResNet-18's second of 8 blocks: between the leanest recomputing plan and the plain one lie
    rungs that re-run less (`test_no_way_to_recompute_a_stage_beats_its_rungs`); a budget gets the
    cheapest rung it fits."""
    cfg = load_config(overrides=["train.batch_size=8", "train.recompute=auto", "model.name=resnet18", "model.blocks=8"])
    net = StageNet(build_model("resnet18", (3, 32, 32), 10, 0.25, 8))
    method = NeuLite(net, cfg)
    plan = net.plan(2, harmonize=True, mentor=True)
    rungs = method.rungs(plan)
    peaks = [method.memory(r).total for r in rungs]
    assert len(rungs) >= 2
    for rung, peak in zip(rungs, peaks, strict=True):
        assert method.variants(plan)[method.assign(plan, peak)] == rung
        assert method.variants(plan)[method.assign(plan, peak + 1)] == rung  # not a leaner, slower one
