"""Built-in networks: block split, shapes, parameter counts and width scaling."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.models.blocks import BlockModel, tail_modules
from neulite.models.zoo import MODEL_NAMES, BasicBlock, InvertedResidual, build_model

SHAPES = [(1, 28, 28), (3, 32, 32)]
NUM_BLOCKS = {"small_cnn": 3, "resnet18": 4, "resnet34": 4, "vgg11": 5, "vgg16": 5, "mobilenetv2": 4, "vit_tiny": 3}


@functools.cache
def _model(name: str, shape: tuple[int, int, int], num_classes: int = 10, width: float = 1.0) -> BlockModel:
    torch.manual_seed(0)
    return build_model(name, shape, num_classes, width)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names_are_what_the_config_accepts_and_the_tests_cover():
    assert set(NUM_BLOCKS) == set(MODEL_NAMES)  # every built-in model is under the parametrized tests below
    for name in MODEL_NAMES:
        assert load_config(overrides=[f"model.name={name}"]).model.name == name
    with pytest.raises(
        NeuliteError, match="model.name: unknown model 'resnet50': valid names are " + ", ".join(MODEL_NAMES)
    ):
        load_config(overrides=["model.name=resnet50"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_blocks(name, shape):
    model = _model(name, shape)
    assert isinstance(model, BlockModel)
    assert model.num_blocks == NUM_BLOCKS[name]
    assert len(model.block_shapes) == NUM_BLOCKS[name]
    model.train()
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    # every block has a conv tail for the Harmonizer
    for block in model.blocks:
        assert tail_modules(block)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_inplace_activations(name):
    model = _model(name, (3, 32, 32))
    for m in model.modules():
        assert not getattr(m, "inplace", False), f"{type(m).__name__} is in-place"


def test_num_classes_used():
    model = build_model("small_cnn", (1, 28, 28), 3)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    assert model.num_classes == 3


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnet_block_shapes(name):
    assert _model(name, (3, 32, 32)).block_shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert _model(name, (1, 28, 28)).block_shapes == [(64, 28, 28), (128, 14, 14), (256, 7, 7), (512, 4, 4)]


@pytest.mark.parametrize("name", ["vgg11", "vgg16"])
def test_vgg_block_shapes(name):
    assert _model(name, (1, 28, 28)).block_shapes == [(64, 14, 14), (128, 7, 7), (256, 3, 3), (512, 1, 1), (512, 1, 1)]
    assert _model(name, (3, 32, 32)).block_shapes == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 2, 2)]


def test_mobilenetv2_and_small_cnn_block_shapes():
    assert _model("mobilenetv2", (3, 32, 32)).block_shapes == [(24, 32, 32), (32, 16, 16), (96, 8, 8), (1280, 4, 4)]
    assert _model("small_cnn", (1, 28, 28)).block_shapes == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]


def test_parameter_counts():
    # the well-known CIFAR ResNet counts (3x3 stem, no maxpool, 10 classes)
    assert _n_params(_model("resnet18", (3, 32, 32))) == 11_173_962
    assert _n_params(_model("resnet34", (3, 32, 32))) == 21_282_122
    # torchvision's MobileNetV2 with a 10-class classifier has the same parameters
    assert _n_params(_model("mobilenetv2", (3, 32, 32))) == 2_236_682


def test_resnet_tail_is_last_basic_block_conv2_bn2():
    model = _model("resnet18", (3, 32, 32))
    for block in model.blocks:
        tail = tail_modules(block)
        last = [m for m in block.modules() if isinstance(m, BasicBlock)][-1]
        mods = dict(block.named_modules())
        assert [mods[n] for n in tail] == [last.conv2, last.bn2]


def test_mobilenetv2_tail():
    model = _model("mobilenetv2", (3, 32, 32))
    for block in model.blocks[:3]:
        tail = tail_modules(block)
        assert tail[0].endswith("project") and tail[1].endswith("project_bn")
        last = [m for m in block.modules() if isinstance(m, InvertedResidual)][-1]
        mods = dict(block.named_modules())
        assert [mods[n] for n in tail] == [last.conv.project, last.conv.project_bn]
    assert tail_modules(model.blocks[3]) == ["last_conv.conv", "last_conv.bn"]


@pytest.mark.parametrize("width", [0.5, 0.25, 0.01])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_width_gives_leading_slices(name, width):
    shape = (3, 32, 32)
    full = _model(name, shape).state_dict()
    small_model = _model(name, shape, 10, width)
    small = small_model.state_dict()
    assert small.keys() == full.keys()
    for key, t in small.items():
        ref = full[key]
        assert t.dim() == ref.dim(), key
        assert all(a <= b for a, b in zip(t.shape, ref.shape, strict=True)), (key, tuple(t.shape), tuple(ref.shape))
    # the input channels and the class count never scale
    first_conv = next(m for m in small_model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 3
    assert small_model.head.fc.out_features == 10
    assert small_model(torch.zeros(2, *shape)).shape == (2, 10)


def test_width_half_channels():
    model = _model("resnet18", (3, 32, 32), 10, 0.5)
    assert model.block_shapes == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert model.head.fc.in_features == 256
    assert _model("mobilenetv2", (3, 32, 32), 10, 0.5).block_shapes[-1] == (640, 4, 4)


def test_width_is_at_least_one_channel():
    model = build_model("small_cnn", (1, 28, 28), 10, width=1e-6)
    assert [s[0] for s in model.block_shapes] == [1, 1, 1]


def test_init():
    model = _model("resnet18", (3, 32, 32))
    bn = model.blocks[0].stem.bn
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    conv = model.blocks[1].layer2[0].conv1
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5  # kaiming normal, fan_out
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.1


def test_unknown_name():
    with pytest.raises(NeuliteError, match="unknown model 'resnet50': valid names are") as exc:
        build_model("resnet50", (3, 32, 32), 10)
    msg = str(exc.value)
    assert "\n" not in msg
    for name in MODEL_NAMES:
        assert name in msg


@pytest.mark.parametrize("width", [0, -0.5, float("nan"), float("inf"), "wide"])
def test_bad_width(width):
    with pytest.raises(NeuliteError, match=f"model width must be a positive number, got {width!r}"):
        build_model("small_cnn", (1, 28, 28), 10, width=width)


@pytest.mark.parametrize(
    "shape,classes,message",
    [
        ((28, 28), 10, r"model 'small_cnn' takes \(C, H, W\) images, got input shape \(28, 28\)"),
        (
            (1, 0, 28),
            10,
            r"input shape must be \(C, H, W\) images, \(C, L\) sequences or \(F,\) vectors, got \(1, 0, 28\)",
        ),
        ((1, 1, 28, 28), 10, r"input shape must be \(C, H, W\) images, .* got \(1, 1, 28, 28\)"),
        ((1, 28, 28), 0, "number of classes must be a positive integer, got 0"),
        ((1, 28, 28), 2.5, r"the class count a positive integer, got \(1, 28, 28\) and 2.5"),
    ],
)
def test_bad_shape_or_classes(shape, classes, message):
    with pytest.raises(NeuliteError, match=message):
        build_model("small_cnn", shape, classes)


def test_too_small_input_is_a_neulite_error():
    with pytest.raises(
        NeuliteError, match=r"model cannot be split: forward through blocks failed for input shape \(3, 8, 8\)"
    ):
        build_model("vgg11", (3, 8, 8), 10)


def test_a_model_cut_into_n_blocks_draws_the_same_weights_whether_its_cuts_are_cached_or_not():
    from neulite.models.zoo import _units_at_full_width

    _units_at_full_width.cache_clear()
    torch.manual_seed(0)
    first = build_model("small_cnn", (1, 12, 12), 10, 0.5, blocks=4)
    after_first = torch.rand(1)
    torch.manual_seed(0)
    second = build_model("small_cnn", (1, 12, 12), 10, 0.5, blocks=4)  # cuts from the cache now
    assert torch.equal(after_first, torch.rand(1))  # the seeded stream is where it would be without a cache
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
