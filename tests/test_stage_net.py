import pytest
import torch
from torch import nn

from neulite.errors import NeuliteError
from neulite.models.blocks import BlockModel, ClassifierHead, tail_modules
from neulite.models.stage_net import StageNet
from neulite.models.zoo import MODEL_NAMES, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_modules_imitate_the_missing_blocks(name: str):
    net = StageNet(build_model(name, (3, 32, 32), 10, width=0.25))
    model = net.model
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        for t in range(1, net.num_stages + 1):
            z, logits = net.stage_forward(x, net.plan(t))
            assert logits.shape == (2, 10)
            assert tuple(z.shape[1:]) == model.block_shapes[-1], f"stage {t}: Z must have the last block's shape"
            if t < net.num_stages:
                op = net.outputs[t - 1]
                assert len(op.layers) == net.num_stages - t, "one light layer per missing block"
                assert type(op.head) is type(model.head)
                assert [p.shape for p in op.head.parameters()] == [p.shape for p in model.head.parameters()]


def test_light_layers_follow_each_missing_block_shape():
    net = StageNet(build_model("resnet18", (3, 32, 32), 10, width=0.25))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = net.model.blocks[0](x)
        for k, layer in enumerate(net.outputs[0].layers, start=1):
            h = layer(h)
            assert tuple(h.shape[1:]) == net.model.block_shapes[k]


def test_user_model_as_blocks_with_flat_features():
    model = BlockModel(
        [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 6), nn.ReLU())],
        ClassifierHead(6, 3),
        (4,),
        3,
    )
    net = StageNet(model)
    z, logits = net.stage_forward(torch.randn(5, 4), net.plan(1, harmonize=True, mentor=True))
    assert z.shape == (5, 6) and logits.shape == (5, 3)


def test_models_that_cannot_be_split_are_named():
    with pytest.raises(NeuliteError, match="cannot be split"):
        BlockModel([], ClassifierHead(4, 2), (4,), 2)
    with pytest.raises(NeuliteError, match="cannot be split"):
        BlockModel([nn.Linear(4, 8), nn.Linear(7, 2)], ClassifierHead(2, 2), (4,), 2)
    with pytest.raises(NeuliteError, match="head returns shape"):
        BlockModel([nn.Linear(4, 8)], ClassifierHead(8, 3), (4,), 2)


def test_harmonizer_tail_is_last_conv_and_norm():
    model = build_model("resnet18", (3, 32, 32), 10, width=0.25)
    assert tail_modules(model.blocks[0]) == ["layer1.1.conv2", "layer1.1.bn2"]
    one_layer = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    assert tail_modules(one_layer) == ["1"]  # a part of the block: its norm, not the whole block
    assert tail_modules(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) == []
    with pytest.raises(NeuliteError, match="no conv or linear"):
        tail_modules(nn.Sequential(nn.ReLU()))


def test_plans_send_only_what_the_stage_needs():
    net = StageNet(build_model("small_cnn", (1, 28, 28), 10))
    plan = net.plan(2, harmonize=True, mentor=True)
    down, up = set(net.down_names(plan)), set(net.up_names(plan))
    assert up <= down
    assert not any(
        n.startswith(("model.blocks.2", "outputs.0", "outputs.2", "projections.0", "model.head")) for n in down
    )
    assert {n for n in down - up} == {
        n
        for n in net.state_names(("model.blocks.0",))
        if not n.startswith("model.blocks.0.layer1.1.conv2") and not n.startswith("model.blocks.0.layer1.1.bn2")
    }
    assert any(n.startswith("model.blocks.0.layer1.1.bn2.running_mean") for n in up)
    assert all(
        any(n.startswith(p) for p in ("model.blocks.1", "model.blocks.0.layer1.1", "outputs.1", "projections.1"))
        for n in up
    )
    no_harm = net.plan(2, harmonize=False, mentor=False)
    assert not any(n.startswith("model.blocks.0") for n in net.up_names(no_harm))
    assert not any(n.startswith("projections") for n in net.down_names(no_harm))
    last = net.plan(3, harmonize=True, mentor=True)
    assert any(n.startswith("model.head") for n in net.up_names(last))
    assert set(net.down_names(net.plan(0))) == set(net.model.state_dict(prefix="model.").keys())
