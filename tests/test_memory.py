import ast
import functools
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import neulite.memory
from examples.user_cnns import heavy_cnn, plain_cnn
from neulite.algorithms.base import Method
from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.registry import build_method, build_network
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.memory import HEAP_BLOCK, LiveTensorBytes, estimate, footprint, measure
from neulite.memory_report import memory_report, reestimated
from neulite.models.blocks import BlockModel, ClassifierHead
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.saved_tensors import SavedTensorCounter

F32 = 4


def toy_net() -> StageNet:
    blocks = [
        nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU()),
    ]
    return StageNet(BlockModel(blocks, ClassifierHead(6, 3), (4,), 3))


def test_estimate_matches_a_hand_count_on_a_toy_model():
    """Batch 5, full model: every term counted by hand.

    weights: 4*8 + 8*6 + (6*3 + 3) = 101 floats. Saved for backward: ReLU1's output (5x8; Linear2
    saves the same storage), ReLU2's output (5x6; the head's Linear saves that storage again),
    log_softmax's output (5x3) and nll_loss's total_weight (1 float). The input batch and the
    int64 targets are counted as the batch, not as activations.
    """
    net = toy_net()
    est = estimate(net, net.full_plan(), 5, cross_entropy_loss)
    assert est.weights == est.gradients == est.optimizer == 101 * F32
    assert est.batch == 5 * 4 * F32 + 5 * 8
    assert est.activations == (5 * 8 + 5 * 6 + 5 * 3 + 1) * F32
    assert est.frozen_forward == 0


def test_frozen_prefix_keeps_nothing_for_backward():
    """Stage 2 without Harmonizer: block 1 runs without autograd; its output and ReLU's are the
    prefix transient (2 x 5x8 floats), and Linear2 saves the prefix output once."""
    net = toy_net()
    plan = net.plan(2)
    est = estimate(net, plan, 5, cross_entropy_loss)
    assert est.frozen_forward == 2 * 5 * 8 * F32
    assert est.gradients == (8 * 6 + 6 * 3 + 3) * F32
    assert est.weights == 101 * F32  # the client holds the frozen block too
    assert est.activations == (5 * 8 + 5 * 6 + 5 * 3 + 1) * F32


def test_stages_need_less_than_full_model_for_resnet():
    """ResNet-18's first stage (stem and layer1 at full resolution, and the output module's strided
    light layers there) is its largest: 59% of full-model training measured at batch 64."""
    cfg = load_config(overrides=["model.name=resnet18", "model.width=0.5"])
    net = build_network(cfg, (3, 32, 32), 10)
    full = estimate(net, net.full_plan(), 32, cross_entropy_loss).total
    method = build_method(cfg, net)
    assert max(method.memory(p).total for p in method.plans()) < 0.65 * full


def test_the_memory_module_depends_on_models_and_leaf_modules_only():
    imported = {
        node.module
        for node in ast.walk(ast.parse(inspect.getsource(neulite.memory)))
        if isinstance(node, ast.ImportFrom)
    }
    assert all(
        not m.startswith("neulite.")
        or m.startswith("neulite.models")
        or m in ("neulite.saved_tensors", "neulite.errors", "neulite.optim")
        for m in imported
    ), imported


@pytest.mark.parametrize(("method", "stage"), [("fedavg", 0), ("neulite", 1), ("neulite", 3), ("depthfl", 0)])
def test_estimate_of_each_methods_step_holds_against_the_measured_peak(method: str, stage: int):
    """The step a method's clients really run (NeuLite's Mentor terms, DepthFL's exits and
    distillation at the deepest level), estimated and measured."""
    cfg = load_config(overrides=[f"method.name={method}"])
    m = build_method(cfg, build_network(cfg, (1, 28, 28), 10))
    plan = m.depth_plan(0) if method == "depthfl" else m.plans()[max(stage - 1, 0)]
    assert plan.stage == (3 if method == "depthfl" else stage)
    est = m.memory(plan).total
    real = measure(m.net, plan, cfg.train.batch_size, m.loss(m.task_config(plan)))
    assert abs(est - real) / real < 0.15, (est, real)


@pytest.mark.parametrize("channels, side, stride", [((4, 8), 6, 1), ((64, 64), 2, 1), ((4, 8), 6, 2)])
def test_a_convolution_counts_the_copies_onednn_computes_on(channels: tuple[int, int], side: int, stride: int):
    """Forward: blocked copies of the input and weights, or the blocked output before it is copied
    out, whichever is larger; backward, one phase after another: copies of the output gradient and
    the input, or the blocked weight gradient being copied out, whichever is larger. Both on top of
    the op's outputs, which no tensor the step holds shows. Strided, its input gradient's own buffer
    and the input's copy: twice the input."""

    def size(t: torch.Tensor) -> int:
        return t.numel() * F32

    conv = nn.Conv2d(*channels, 3, stride=stride, padding=1, bias=False)
    x = torch.randn(2, channels[0], side, side, requires_grad=True)
    with torch.no_grad(), LiveTensorBytes() as forward:
        y = conv(x)
    assert forward.peak == size(y) + max(size(x) + size(conv.weight), size(y))
    y = conv(x)
    grad = torch.ones_like(y)
    with LiveTensorBytes() as backward:
        y.backward(grad)
    workspace = max(size(grad) + size(x), size(conv.weight), 2 * size(x) if stride > 1 else 0)
    assert backward.peak == footprint(size(x.grad)) + footprint(size(conv.weight.grad)) + workspace


def test_freed_heap_blocks_stay_in_the_peak():
    """A block below `HEAP_BLOCK` stays resident in the C heap once freed, a larger one is unmapped:
    a freed small storage still adds to a later large one's peak, a freed large one does not. A
    mapped block holds whole pages, its allocator header included."""
    with LiveTensorBytes() as step:
        small = torch.ones(HEAP_BLOCK // F32 // 4)
        del small
        large = torch.ones(4 * HEAP_BLOCK // F32)
        del large
        torch.ones(4 * HEAP_BLOCK // F32)
    assert step.peak == HEAP_BLOCK // 4 + 5 * HEAP_BLOCK
    assert footprint(HEAP_BLOCK - 1) == HEAP_BLOCK - 1 and footprint(HEAP_BLOCK) == 2 * HEAP_BLOCK


@functools.cache
def heavy_neulite() -> Method:
    """The weight-heavy user CNN (32-96-192-384 channels) on 8x8 inputs, at the default batch of 32."""
    return build_method(load_config(overrides=["method.name=neulite"]), StageNet(heavy_cnn((3, 8, 8), 10)))


@pytest.mark.parametrize("stage", [0, 3, 4])
def test_estimate_holds_against_the_measurement_on_a_weight_heavy_cnn(stage: int):
    """Weights, gradients and momentum are most of the peak, oneDNN's weight-sized copies most of
    the rest. The estimate used to miss those copies and the measurement (the allocated peak) to
    count a scratchpad oneDNN books and never writes: 42-46% apart; then counting the backward's
    copies all at once put stage 3 12-14% above. The full model, that stage and the costliest are
    checked here, every stage by benchmarks/memory.py."""
    m = heavy_neulite()
    if stage == 0:
        plan, loss = m.net.full_plan(), cross_entropy_loss
        est = estimate(m.net, plan, 32, loss).total
    else:
        plan = m.plans()[stage - 1]
        loss, est = m.loss(m.task_config(plan)), m.memory(plan).total
    real = measure(m.net, plan, 32, loss)
    assert abs(est - real) < 0.10 * real, (est, real)


def test_a_strided_layers_input_gradient_buffer_is_counted():
    """The VGG-like user CNN's stage 2 trains a strided conv at full resolution, whose backward holds
    an input-sized buffer for the input gradient besides the input's copy: without it the estimate
    was 8% below the measurement, with it within 1% (5% allowed for a busy host)."""
    m = build_method(load_config(overrides=["method.name=neulite"]), StageNet(plain_cnn((3, 32, 32), 10)))
    plan = m.plans()[1]
    est, real = m.memory(plan).total, measure(m.net, plan, 32, m.loss(m.task_config(plan)))
    assert abs(est - real) < 0.05 * real, (est, real)


def test_measure_agrees_with_an_independent_resident_memory_check():
    """benchmarks/rss_check.py reads a client's peak resident memory with code of its own (a child
    started with MALLOC_MMAP_THRESHOLD_ at one page, warmed on a twin, VmHWM restarted). The allocated
    peak that `measure` used to report was 1.55x that figure on this network."""
    spec = importlib.util.spec_from_file_location(
        "rss_check", Path(__file__).parents[1] / "benchmarks" / "rss_check.py"
    )
    rss_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rss_check)
    net = StageNet(heavy_cnn((3, 8, 8), 10))
    independent = rss_check.resident_peak(net, net.full_plan(), 32, cross_entropy_loss)
    measured = measure(net, net.full_plan(), 32, cross_entropy_loss)  # one after the other, never side by side
    # in 7 pairs on a loaded host (one in the suite) the check read 12.7-13.2 MiB and `measure`
    # 13.2-14.0 MiB, 1.8-6.1% more; the defect this guards against read 55% more
    assert abs(measured - independent) < 0.08 * independent, (measured, independent)


SCRIPT = """
import sys
from neulite.algorithms.local import cross_entropy_loss
from neulite.memory import measure
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.models.zoo import build_model

def main():
    net = StageNet(build_model("small_cnn", (1, 28, 28), 10, 0.5, 0))
    print("peak", measure(net, net.full_plan(), 8, cross_entropy_loss))
"""


def test_measure_takes_a_network_of_more_tensors_than_a_forkserver_passes_descriptors():
    # 284 tensors: handed over one file descriptor each, the forkserver refused them ("too many fds")
    net = StageNet(build_model("resnet34", (3, 8, 8), 10, 0.125))
    assert len(net.state_dict()) > 256
    assert measure(net, net.full_plan(), 4, cross_entropy_loss) > 0


@pytest.mark.parametrize("guarded", [True, False])
def test_measure_from_a_script_with_or_without_a_main_guard_never_hangs(tmp_path, guarded: bool):
    script = tmp_path / "mine.py"
    script.write_text(SCRIPT + ('if __name__ == "__main__":\n    main()\n' if guarded else "main()\n"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    if guarded:
        assert done.returncode == 0 and done.stdout.startswith("peak ") and int(done.stdout.split()[1]) > 0
        assert done.stderr == ""  # the profiler's log lines stay out of the user's terminal
    else:
        assert done.returncode != 0 and 'if __name__ == "__main__":' in done.stderr


def test_the_same_layers_on_larger_inputs_are_estimated_anew():
    """The estimate is cached per architecture: the input size is part of it (a global-pooled CNN's
    layers do not show it)."""
    small, large = (StageNet(build_model("small_cnn", (1, s, s), 10, 0.5)) for s in (12, 16))
    assert [tuple(t.shape) for t in small.state_dict().values()] == [
        tuple(t.shape) for t in large.state_dict().values()
    ]
    assert (
        estimate(large, large.full_plan(), 8, cross_entropy_loss).total
        > estimate(small, small.full_plan(), 8, cross_entropy_loss).total
    )


def test_an_estimate_stays_cached_while_a_thousand_others_are_made(monkeypatch: pytest.MonkeyPatch):
    """A planner estimates a thousand recomputation variants and more in one process: the one it made
    first is not made again (a cache that emptied itself when full paid for them twice)."""
    made: list[int] = []

    def account(net, plan, batch_size, loss):  # stands in for the real step
        made.append(batch_size)
        return neulite.memory.MemoryBreakdown(0, 0, 0, batch_size, 0, 0, 0), 0

    monkeypatch.setattr(neulite.memory, "_estimate", account)
    monkeypatch.setattr(neulite.memory, "_ESTIMATES", type(neulite.memory._ESTIMATES)())
    net = StageNet(build_model("small_cnn", (1, 12, 12), 10, 0.5))
    for batch in [1, *range(2, 1100), 1]:
        assert estimate(net, net.full_plan(), batch, cross_entropy_loss).batch == batch
    assert made == list(range(1, 1100))


def test_reestimated_keeps_the_measurements_and_compares_them_with_todays_estimate():
    """What `benchmarks/memory.py --estimates-only` writes after a change to the estimator."""
    report = memory_report("small_cnn", 16, (1, 28, 28), with_measurement=False)
    today = [r["estimated_bytes"] for r in [report["full"], *report["stages"]]]
    report["full"]["measured_bytes"] = 2 * today[0]
    for r, est in zip(report["stages"], today[1:], strict=True):
        r["measured_bytes"], r["step_seconds"] = est, 0.5
    for r in [report["full"], *report["stages"]]:
        r["estimated_bytes"] = 1  # an estimator that has since changed
    new = reestimated(report)
    assert [r["estimated_bytes"] for r in [new["full"], *new["stages"]]] == today
    assert new["full"]["estimate_error"] == -0.5 and all(r["estimate_error"] == 0 for r in new["stages"])
    assert all(r["step_seconds"] == 0.5 for r in new["stages"])
    retimed = reestimated(report, retime=True)  # memory.py --retime: the steps timed again, the peaks kept
    assert all(r["step_seconds"] not in (None, 0.5) for r in [retimed["full"], *retimed["stages"]])
    assert [r["measured_bytes"] for r in retimed["stages"]] == today[1:]
    assert new["stages"][0]["measured_fraction_of_full"] == today[1] / (2 * today[0])
    assert new["worst_stage_fraction"] == max(today[1:]) / today[0]
    report["stages"][0]["segment"] = report["stages"][0]["segment"] + 1  # measured on another plan
    with pytest.raises(NeuliteError, match="stage 1 now plans segment = 0, measured with 1"):
        reestimated(report)
    report["stages"][0]["segment"] -= 1
    report["stages"][0]["recompute_prefix"] = True
    with pytest.raises(NeuliteError, match="stage 1 now plans recompute_prefix = False, measured with True"):
        reestimated(report)
    del report["stages"][0]["recompute_prefix"]  # a row written before the field: measured with its default
    report["stages"][0]["kept_segments"] = 0
    with pytest.raises(NeuliteError, match="stage 1 now plans kept_segments = 1, measured with 0"):
        reestimated(report)


def test_the_saved_activations_are_what_autograd_holds_when_the_forward_ends():
    """A graph dropped during the forward (its saved tensors freed, their addresses free for later
    ones) is not held: the figure was counted by address, and varied with where memory landed."""
    w = torch.ones(1000, requires_grad=True)
    counter = SavedTensorCounter([w])
    with counter.hooks():
        kept = (w * torch.randn(1000)).sigmoid()  # saves the random factor and the sigmoid's output
        dropped = (w * torch.randn(1000)).exp()
        del dropped
        assert sum(counter.held().values()) == 2 * 1000 * 4
    assert kept.requires_grad
