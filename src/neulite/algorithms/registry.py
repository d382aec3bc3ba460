"""Method names, as the CLI and the JSON use them, mapped to configured algorithm objects."""

from __future__ import annotations

from neulite.algorithms.allsmall import AllSmall
from neulite.algorithms.base import Method
from neulite.algorithms.depthfl import DepthFL
from neulite.algorithms.fedavg import FedAvg
from neulite.algorithms.fedrolex import FedRolex
from neulite.algorithms.heterofl import HeteroFL
from neulite.algorithms.neulite import NeuLite
from neulite.algorithms.profl import ProFL
from neulite.config import METHODS, Config
from neulite.errors import NeuliteError
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model


def make_method(net: StageNet, cfg: Config) -> Method:
    m = cfg.method
    name = m.name
    if name == "fedavg":
        return FedAvg(net, cfg, exclusive=False)
    if name == "exclusivefl":
        return FedAvg(net, cfg, exclusive=True)
    baselines = {"allsmall": AllSmall, "heterofl": HeteroFL, "fedrolex": FedRolex, "depthfl": DepthFL, "profl": ProFL}
    if name in baselines:
        return baselines[name](net, cfg)
    variants = {
        "neulite": (m.schedule, m.mentor, m.harmonizer),
        "neulite-cyclic": ("cyclic", m.mentor, m.harmonizer),
        "neulite-no-mentor": (m.schedule, False, m.harmonizer),
        "neulite-no-harmonizer": (m.schedule, m.mentor, False),
        "neulite-plain": (m.schedule, False, False),
    }
    if name not in variants:
        raise NeuliteError(f"unknown method {name!r} (valid: {', '.join(METHODS)})")
    schedule, mentor, harmonizer = variants[name]
    return NeuLite(net, cfg, schedule=schedule, mentor=mentor, harmonizer=harmonizer)


def build_method(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> tuple[StageNet, Method]:
    """The configured network with its scaffolding, and the method that trains it (every driver
    builds its server and client sides this way; build under `torch.device("meta")` for a
    client skeleton that holds no weights)."""
    net = StageNet(build_model(cfg.model.name, input_shape, num_classes, cfg.model.width, cfg.model.blocks))
    return net, make_method(net, cfg)
