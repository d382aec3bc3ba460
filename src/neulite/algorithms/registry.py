"""The one place methods are registered: name -> factory, and each `[method.SECTION]` table's options.

Adding a method: its file (a `Method` subclass, and an options dataclass if it has knobs), plus a
line here (and one in `SECTIONS` for its options).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from neulite.algorithms.allsmall import AllSmall
from neulite.algorithms.base import Method
from neulite.algorithms.depthfl import DepthFL, DepthFLOptions
from neulite.algorithms.fedavg import FedAvg
from neulite.algorithms.fedrolex import FedRolex
from neulite.algorithms.heterofl import HeteroFL
from neulite.algorithms.neulite import NeuLite, NeuLiteOptions
from neulite.algorithms.profl import ProFL, ProFLOptions
from neulite.config import Config
from neulite.errors import NeuliteError
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model

METHODS: dict[str, Callable[[StageNet, Config], Method]] = {
    "neulite": NeuLite,
    "neulite-cyclic": partial(NeuLite, schedule="cyclic"),
    "neulite-no-mentor": partial(NeuLite, mentor=False),
    "neulite-no-harmonizer": partial(NeuLite, harmonizer=False),
    "neulite-plain": partial(NeuLite, mentor=False, harmonizer=False),
    "neulite-elastic": partial(NeuLite, max_window=0),
    "neulite-elastic-backward": partial(NeuLite, max_window=0, window_direction="backward"),
    "fedavg": FedAvg,
    "exclusivefl": partial(FedAvg, exclusive=True),
    "allsmall": AllSmall,
    "heterofl": HeteroFL,
    "fedrolex": FedRolex,
    "depthfl": DepthFL,
    "profl": ProFL,
    "neulite-adaptive": partial(ProFL, mentor=True, harmonizer=True),
}

SECTIONS: dict[str, type] = {"neulite": NeuLiteOptions, "depthfl": DepthFLOptions, "profl": ProFLOptions}


def sections_read(name: str) -> tuple[str, ...]:
    """The `[method.SECTION]` tables the registered method `name` reads (`Method.sections`)."""
    factory = METHODS[name]
    return getattr(factory, "func", factory).sections


def build_network(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> StageNet:
    """The configured network with its scaffolding (build under `torch.device("meta")` for a
    client skeleton that holds no weights)."""
    return StageNet(build_model(cfg.model.name, input_shape, num_classes, cfg.model.width, cfg.model.blocks))


def build_method(cfg: Config, net: StageNet) -> Method:
    """The configured method, which from here on owns `net` (it may rebuild or wrap it)."""
    method = METHODS[cfg.method.name](net, cfg)
    if cfg.train.recompute != "off" and not isinstance(method, NeuLite):
        raise NeuliteError(
            f"bad config: train.recompute = {cfg.train.recompute!r} applies to the neulite methods and profl, "
            f'not {cfg.method.name}: set it to "off"'
        )
    return method
