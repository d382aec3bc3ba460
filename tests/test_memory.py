import pytest
from torch import nn

from neulite.memory import estimate, measure
from neulite.models.blocks import BlockModel, ClassifierHead
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model

F32 = 4


def toy_net() -> StageNet:
    blocks = [nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU()), nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU())]
    return StageNet(BlockModel(blocks, ClassifierHead(6, 3), (4,), 3))


def test_estimate_matches_a_hand_count_on_a_toy_model():
    """Batch 5, full model: every term counted by hand.

    weights: 4*8 + 8*6 + (6*3 + 3) = 101 floats. Saved for backward: ReLU1's output (5x8; Linear2
    saves the same storage), ReLU2's output (5x6; the head's Linear saves that storage again),
    log_softmax's output (5x3) and nll_loss's total_weight (1 float). The input batch and the
    int64 targets are counted as the batch, not as activations.
    """
    net = toy_net()
    est = estimate(net, net.plan(0), batch_size=5)
    assert est.weights == est.gradients == est.optimizer == 101 * F32
    assert est.batch == 5 * 4 * F32 + 5 * 8
    assert est.activations == (5 * 8 + 5 * 6 + 5 * 3 + 1) * F32
    assert est.frozen_forward == 0


def test_frozen_prefix_keeps_nothing_for_backward():
    """Stage 2 without Harmonizer: block 1 runs without autograd; its output and ReLU's are the
    prefix transient (2 x 5x8 floats), and Linear2 saves the prefix output once."""
    net = toy_net()
    plan = net.plan(2)
    est = estimate(net, plan, batch_size=5)
    assert est.frozen_forward == 2 * 5 * 8 * F32
    assert est.gradients == (8 * 6 + 6 * 3 + 3) * F32
    assert est.weights == 101 * F32  # the client holds the frozen block too
    assert est.activations == (5 * 8 + 5 * 6 + 5 * 3 + 1) * F32


def test_stages_need_less_than_full_model_for_resnet():
    net = StageNet(build_model("resnet18", (3, 32, 32), 10, width=0.5))
    full = estimate(net, net.plan(0), 32).total
    stages = [estimate(net, net.plan(t, harmonize=True, mentor=True), 32).total for t in range(1, 5)]
    assert max(stages) < 0.6 * full


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_estimate_holds_against_measured_allocator_peak(stage: int):
    net = StageNet(build_model("small_cnn", (1, 28, 28), 10))
    plan = net.plan(stage, harmonize=stage > 0, mentor=stage > 0)
    est = estimate(net, plan, 32).total
    real = measure(net, plan, 32)
    assert abs(est - real) / real < 0.15, (est, real)
