"""Networks by name: the built-ins, each a `BlockModel` with one block per resolution stage, and
users' own, registered from Python (`register_model`) or named by import path ("module:function").

`width` multiplies every hidden channel count (never the input channels nor the class count).
Every structural decision (shortcuts, residual connections, expansion layers) is taken on the
full-width channel counts, so a width-w model has exactly the parameter names of the full model
and each of its tensors is a leading slice of the full model's tensor (HeteroFL-style sub-models).
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from neulite.errors import NeuliteError
from neulite.importing import Registry
from neulite.models.balance import balanced_cuts, has_layer, split_at, unit_costs, units
from neulite.models.blocks import BlockModel, ClassifierHead, on_meta
from neulite.models.recompute import recomputable
from neulite.models.vit import vit_tiny

MODEL_NAMES: tuple[str, ...] = ("small_cnn", "resnet18", "resnet34", "vgg11", "vgg16", "mobilenetv2", "vit_tiny")


def _scaler(width: float) -> Callable[[int], int]:
    def ch(c: int) -> int:
        return max(1, int(round(c * width)))

    return ch


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs with zero bias, BatchNorm weight 1 and bias 0.

    Linear layers (the classifier head) keep torch's default init, the same one `fresh_head`
    gives a re-initialised head. A skeleton on the meta device has no values to draw (and drawing
    them there imports torch's compiler: `cpu_twin`).
    """
    if on_meta(model):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn_act(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(cout),
            act=act(inplace=False),
        )
    )


# ----------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus (projection) shortcut, then ReLU.

    The shortcut is registered first so that conv2/bn2 are the block's last parametrised layers.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, projection: bool | None = None) -> None:
        super().__init__()
        if projection is None:
            projection = stride != 1 or in_planes != planes
        if projection:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = recomputable(self._first, x, [self.bn1])
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def _resnet(
    layers: Sequence[int],
    input_shape: tuple[int, int, int],
    num_classes: int,
    width: float,
    full_channels: Sequence[int] = (64, 128, 256, 512),
) -> BlockModel:
    """CIFAR-style ResNet: one block per resolution stage, the stem joined to the first."""
    ch = _scaler(width)
    blocks: list[nn.Module] = []
    in_full = full_channels[0]
    for stage, (n, planes_full) in enumerate(zip(layers, full_channels, strict=True)):
        units = []
        for i in range(n):
            s = 2 if i == 0 and stage > 0 else 1
            # the projection decision uses full-width counts so every width has the same parameters
            projection = s != 1 or in_full != planes_full
            units.append(BasicBlock(ch(in_full), ch(planes_full), s, projection=projection))
            in_full = planes_full
        layer = nn.Sequential(*units)
        if stage == 0:
            stem = _conv_bn_act(input_shape[0], ch(full_channels[0]), 3)
            blocks.append(nn.Sequential(OrderedDict(stem=stem, layer1=layer)))
        else:
            blocks.append(nn.Sequential(OrderedDict([(f"layer{stage + 1}", layer)])))
    head = ClassifierHead(ch(full_channels[-1]), num_classes)
    return _finish(blocks, head, input_shape, num_classes)


# -------------------------------------------------------------------------------------------- VGG

_VGG_CFG = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # config A
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),  # config D
}


def _vgg(cfg: Sequence[Sequence[int]], input_shape: tuple[int, int, int], num_classes: int, width: float) -> BlockModel:
    ch = _scaler(width)
    blocks: list[nn.Module] = []
    cin = input_shape[0]
    for g, group in enumerate(cfg):
        layers: list[tuple[str, nn.Module]] = []
        for i, c in enumerate(group):
            layers.append((f"conv{i + 1}", _conv_bn_act(cin, ch(c), 3)))
            cin = ch(c)
        if g < len(cfg) - 1:  # the last group has no pool: the head pools globally
            layers.append(("pool", nn.MaxPool2d(2)))
        blocks.append(nn.Sequential(OrderedDict(layers)))
    head = ClassifierHead(ch(cfg[-1][-1]), num_classes)
    return _finish(blocks, head, input_shape, num_classes)


# ------------------------------------------------------------------------------------ MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 unit: [1x1 expand-BN-ReLU6] - 3x3 depthwise-BN-ReLU6 - 1x1 project-BN.

    Layers are registered in execution order, so the projection conv and its BN come last.
    """

    def __init__(self, inp: int, hidden: int, oup: int, stride: int, expand: bool, residual: bool) -> None:
        super().__init__()
        self.use_res_connect = residual
        layers: list[tuple[str, nn.Module]] = []
        if expand:
            layers.append(("expand", _conv_bn_act(inp, hidden, 1, act=nn.ReLU6)))
        layers.append(("depthwise", _conv_bn_act(hidden, hidden, 3, stride=stride, groups=hidden, act=nn.ReLU6)))
        layers.append(("project", nn.Conv2d(hidden, oup, 1, bias=False)))
        layers.append(("project_bn", nn.BatchNorm2d(oup)))
        self.conv = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


# (t, c, n, s) for CIFAR: stride 1 in the stem and in the 24-channel stage
_MBV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_MBV2_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))  # settings indices per block, by resolution


def _mobilenetv2(input_shape: tuple[int, int, int], num_classes: int, width: float) -> BlockModel:
    ch = _scaler(width)
    stages: list[tuple[str, nn.Module]] = []
    in_full = 32
    for t, c, n, s in _MBV2_SETTINGS:
        units = []
        for i in range(n):
            stride = s if i == 0 else 1
            hidden_full = in_full * t
            units.append(
                InvertedResidual(
                    ch(in_full),
                    ch(hidden_full),
                    ch(c),
                    stride,
                    expand=t != 1,
                    residual=stride == 1 and in_full == c,
                )
            )
            in_full = c
        stages.append((f"stage{len(stages) + 1}_{c}", nn.Sequential(*units)))
    blocks: list[nn.Module] = []
    for b, idx in enumerate(_MBV2_GROUPS):
        parts: list[tuple[str, nn.Module]] = []
        if b == 0:
            parts.append(("stem", _conv_bn_act(input_shape[0], ch(32), 3, act=nn.ReLU6)))
        parts.extend(stages[i] for i in idx)
        if b == len(_MBV2_GROUPS) - 1:
            parts.append(("last_conv", _conv_bn_act(ch(in_full), ch(1280), 1, act=nn.ReLU6)))
        blocks.append(nn.Sequential(OrderedDict(parts)))
    head = ClassifierHead(ch(1280), num_classes)
    return _finish(blocks, head, input_shape, num_classes)


# -------------------------------------------------------------------------------------- small CNN


def _small_cnn(input_shape: tuple[int, int, int], num_classes: int, width: float) -> BlockModel:
    """The fast default: a 3-stage residual CNN (2 basic blocks per stage, 16/32/64 channels).

    Blocks of several layers, as the method describes, so that its output modules keep the
    reference's 3x3 light layers (blocks of one conv get compact ones).
    """
    return _resnet((2, 2, 2), input_shape, num_classes, width, full_channels=(16, 32, 64))


# ------------------------------------------------------------------------------------------ entry


def _finish(
    blocks: list[nn.Module], head: nn.Module, input_shape: tuple[int, int, int], num_classes: int
) -> BlockModel:
    for b in blocks:
        _init_weights(b)
    return BlockModel(blocks, head, input_shape, num_classes)


ModelFactory = Callable[[tuple[int, ...], int, float], BlockModel]
"""A network builder: (input_shape, num_classes, width) -> BlockModel. The input shape is a
sample's: (C, H, W) of an image (what the built-ins take), (C, L) of a sequence or (F,) of a
vector. `width` scales the hidden channel counts; width-based methods (HeteroFL, FedRolex,
AllSmall) need each tensor of a width-w model to be a leading slice of the full model's."""

_BUILDERS: dict[str, ModelFactory] = {
    "small_cnn": _small_cnn,
    "resnet18": lambda shape, k, w: _resnet((2, 2, 2, 2), shape, k, w),
    "resnet34": lambda shape, k, w: _resnet((3, 4, 6, 3), shape, k, w),
    "vgg11": lambda shape, k, w: _vgg(_VGG_CFG["vgg11"], shape, k, w),
    "vgg16": lambda shape, k, w: _vgg(_VGG_CFG["vgg16"], shape, k, w),
    "mobilenetv2": _mobilenetv2,
    "vit_tiny": vit_tiny,
}
_MODELS: Registry[ModelFactory] = Registry(
    "model",
    _BUILDERS,
    on_register=lambda: _units_at_full_width.cache_clear(),  # cuts found for an earlier model of a name
)
register_model = _MODELS.register
"""Decorator: `model.name = name` builds the network with the decorated `ModelFactory` (see `Registry`)."""


def model_factory(name: str) -> ModelFactory:
    """The builder `name` stands for: a built-in, a registered name, or an import path."""
    factory = _MODELS.resolve(name)
    assert factory is not None  # every built-in model has its builder
    return factory


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0, blocks: int = 0
) -> BlockModel:
    """Build the network `name` (see `model_factory`) for inputs of `input_shape` and `num_classes` classes.

    `width` scales every hidden channel count to max(1, round(c * width)). `blocks` = 0 keeps the
    network's own blocks (one per resolution stage for the built-ins); N > 0 regroups the layers into N memory-balanced blocks, cut where
    the full-width model balances at batch 64, so every width is cut alike (same tensor names).
    """
    if blocks:
        if not isinstance(blocks, int) or blocks < 1:
            raise NeuliteError(
                f"model blocks must be 0 (one per resolution stage) or a positive integer, got {blocks!r}"
            )
        return split_at(
            build_model(name, input_shape, num_classes, width),
            cut_points(name, input_shape, num_classes, blocks),
        )
    factory = model_factory(name)
    try:
        width = float(width)
    except (TypeError, ValueError):
        raise NeuliteError(f"model width must be a positive number, got {width!r}") from None
    if not (math.isfinite(width) and width > 0):
        raise NeuliteError(f"model width must be a positive number, got {width!r}")
    try:
        shape = tuple(operator.index(s) for s in input_shape)
        num_classes = operator.index(num_classes)
    except TypeError:
        raise NeuliteError(
            f"input shape must be positive integers, (C, H, W) (C, L) or (F,), and the class count a positive "
            f"integer, got {input_shape!r} and {num_classes!r}"
        ) from None
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise NeuliteError(
            f"input shape must be (C, H, W) images, (C, L) sequences or (F,) vectors, got {input_shape!r}"
        )
    if num_classes < 1:
        raise NeuliteError(f"number of classes must be a positive integer, got {num_classes!r}")
    if name in _BUILDERS:
        if len(shape) != 3:
            raise NeuliteError(f"model {name!r} takes (C, H, W) images, got input shape {shape}")
        return _BUILDERS[name](shape, num_classes, width)  # type: ignore[arg-type]
    return _user_model(name, factory, shape, num_classes, width)  # type: ignore[arg-type]


def _user_model(name: str, factory: ModelFactory, shape: tuple[int, ...], num_classes: int, width: float) -> BlockModel:
    """A user's network, checked to be what the rest of neulite assumes."""
    try:
        model = factory(shape, num_classes, width)
    except NeuliteError:
        raise
    except Exception as exc:
        raise NeuliteError(
            f"model {name!r} failed to build for input shape {shape}, {num_classes} classes, width {width}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, BlockModel):
        raise NeuliteError(
            f"model {name!r} must return a neulite BlockModel(blocks, head, input_shape, num_classes), "
            f"got {type(model).__name__}"
        )
    if model.input_shape != shape or model.num_classes != num_classes:
        raise NeuliteError(
            f"model {name!r} was asked for input shape {shape} and {num_classes} classes but built "
            f"{model.input_shape} and {model.num_classes}"
        )
    for tensor_name, t in model.state_dict().items():
        if t.is_floating_point() and t.dtype != torch.float32:
            raise NeuliteError(
                f"model {name!r} holds {tensor_name} as {t.dtype}: neulite trains float32 networks on float32 "
                "data (build it without .double() or .half())"
            )
    return model


def cut_points(name: str, input_shape: tuple[int, ...], num_classes: int, blocks: int) -> list[int]:
    """Where `build_model(name, ..., blocks=blocks)` ends blocks 1..N-1, as indices into the model's units."""
    costs, layers = _units_at_full_width(name, tuple(input_shape), num_classes)
    return balanced_cuts(costs, blocks, layers)


@functools.lru_cache(maxsize=32)
def _units_at_full_width(
    name: str, input_shape: tuple[int, ...], num_classes: int
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The full-width model's `unit_costs` at batch 64 and which units hold a layer (`has_layer`),
    once per network: the planner cuts it into every number of blocks from the same costs."""
    with torch.random.fork_rng():  # cached: drawing from the seeded stream only on a miss would change the run
        model = build_model(name, input_shape, num_classes)
        return tuple(unit_costs(model, 64)), tuple(map(has_layer, units(model)))
