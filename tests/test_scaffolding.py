"""The scaffolding stays a small part of every stage, whatever the blocks, and the set-up says when it cannot."""

import warnings

import pytest
import torch
from torch import nn

from examples.user_cnns import heavy_cnn, plain_cnn
from neulite.algorithms.neulite import NeuLite
from neulite.algorithms.registry import build_method
from neulite.config import Config, TrainConfig
from neulite.errors import NeuliteError
from neulite.models.blocks import BlockModel, ClassifierHead
from neulite.models.output_modules import light_layer
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.scaffolding import MAX_SCAFFOLDING_SHARE, scaffolding_warning
from neulite.server import Server


def _neulite(model: BlockModel, batch_size: int) -> NeuLite:
    method = build_method(Config(train=TrainConfig(batch_size=batch_size)), StageNet(model))
    assert isinstance(method, NeuLite)
    return method


def _too_light(channels: int = 8, blocks: int = 3) -> BlockModel:
    """Blocks of one conv each at one resolution: nothing for the scaffolding to undercut."""
    layers = [
        nn.Sequential(nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        for i in range(blocks)
    ]
    return BlockModel(layers, ClassifierHead(channels, 10), (1, 8, 8), 10)


@pytest.mark.parametrize("user_cnn", [plain_cnn, heavy_cnn])
def test_every_stage_of_a_one_conv_per_block_cnn_is_below_full_training(user_cnn):
    costs = _neulite(user_cnn((1, 28, 28), 10), 32).stage_costs()
    assert len(costs) == 4
    for c in costs:
        assert c.peak < c.full, f"stage {c.stage} needs {c.peak / c.full:.0%} of full-model training"
        assert c.share <= MAX_SCAFFOLDING_SHARE, f"stage {c.stage}: scaffolding is {c.share:.0%} of its peak"
    assert scaffolding_warning(costs, 32) is None


def test_light_layers_are_the_reference_conv_only_where_the_block_dwarfs_it():
    light = StageNet(plain_cnn((1, 28, 28), 10)).outputs[0]
    assert all(any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in layer) for layer in light.layers)
    z, _ = light(torch.zeros(2, 64, 28, 28))
    assert z.shape == (2, 512, 4, 4)
    reference = StageNet(build_model("small_cnn", (1, 28, 28), 10)).outputs[0]
    assert [m.kernel_size for layer in reference.layers for m in layer if isinstance(m, nn.Conv2d)] == [(3, 3)] * 2


def test_compact_layers_of_one_missing_block_can_be_copied_between_output_modules():
    """What `inherit_outputs` does when a stage starts: Op_t's layers 2.. into Op_{t+1}."""
    net = StageNet(heavy_cnn((3, 32, 32), 10))
    for t in range(1, net.num_stages - 1):
        for k, layer in enumerate(net.outputs[t].layers):
            layer.load_state_dict(net.outputs[t - 1].layers[k + 1].state_dict())


def test_compact_flat_light_layer_has_a_ninth_of_the_dense_weights():
    flat = ("flat", "flat")
    dense, compact = light_layer((512,), (256,), kinds=flat), light_layer((512,), (256,), compact=True, kinds=flat)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(compact) <= count(dense) / 8
    assert compact(torch.zeros(3, 512)).shape == (3, 256)


def test_set_up_warns_with_figures_when_blocks_are_too_light():
    with pytest.warns(UserWarning) as caught:
        _neulite(_too_light(), 8).setup({})
    message = str(caught[0].message)
    assert "stage 1 needs" in message and "of full-model training" in message and "scaffolding (" in message
    assert "fewer, larger blocks (model.blocks = N with N < 3" in message


def test_no_stage_fits_says_when_the_stage_saves_nothing():
    method = _neulite(_too_light(), 8)
    full = method.stage_costs()[0].full
    server = Server(method, {0: full}, method.cfg, full, lambda task: {}, {0: 100})
    with pytest.raises(NeuliteError, match=r"budget no stage fits: stage 1 .* saves nothing .* fewer, larger blocks"):
        server.check_feasible()


def test_the_default_model_sets_up_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _neulite(build_model("small_cnn", (1, 28, 28), 10), 32).setup({})
