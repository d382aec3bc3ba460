"""The experiment config: TOML in, validated dataclasses out, one-line errors for anything wrong.

Every section is a frozen dataclass whose `__post_init__` checks its own values; `load_config`
rejects unknown sections and keys by name. `--set section.key=value` overrides use TOML syntax for
the value (strings may be left unquoted).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neulite.data.datasets import DATASET_NAMES
from neulite.errors import NeuliteError
from neulite.models.zoo import MODEL_NAMES


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise NeuliteError(f"bad config: {msg}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    _check(value in options, f"{key} = {value!r} is not one of {', '.join(options)}")


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist5k"
    root: str = ""
    num_clients: int = 20
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    val_fraction: float = 0.1
    on_small: str = "error"
    augment: str = "auto"
    train_size: int = 0  # 0: the whole training set; N: a class-stratified sample of N (seeded by `seed`)

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATASET_NAMES)
        _check(self.num_clients >= 1, "data.num_clients must be >= 1")
        _choice("data.partition", self.partition, ("iid", "dirichlet", "shards"))
        _check(self.alpha > 0, "data.alpha must be > 0")
        _check(self.shards_per_client >= 1, "data.shards_per_client must be >= 1")
        _check(0 <= self.val_fraction < 1, "data.val_fraction must be in [0, 1)")
        _choice("data.on_small", self.on_small, ("error", "clamp"))
        _choice("data.augment", self.augment, ("auto", "on", "off"))
        _check(self.train_size >= 0, "data.train_size must be >= 0 (0 = the whole training set)")


@dataclass(frozen=True)
class ModelConfig:
    """name: a built-in network; width: channel multiplier; blocks: 0 = one block per resolution
    stage, N > 0 = N memory-balanced blocks."""

    name: str = "small_cnn"
    width: float = 1.0
    blocks: int = 0

    def __post_init__(self) -> None:
        _choice("model.name", self.name, MODEL_NAMES)
        _check(self.width > 0, "model.width must be > 0")
        _check(self.blocks >= 0, "model.blocks must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a client, the same for every method."""

    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        _check(self.local_epochs >= 1, "train.local_epochs must be >= 1")
        _check(self.batch_size >= 2, "train.batch_size must be >= 2 (BatchNorm needs two samples)")
        _check(self.lr > 0, "train.lr must be > 0")
        _check(0 <= self.momentum < 1, "train.momentum must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")


METHODS = (
    "neulite", "neulite-cyclic", "neulite-no-mentor", "neulite-no-harmonizer", "neulite-plain",
    "fedavg", "exclusivefl", "allsmall", "heterofl", "fedrolex", "depthfl", "profl",
)


@dataclass(frozen=True)
class MethodConfig:
    """Which algorithm, and the knobs of progressive training.

    rounds: total communication rounds. stage_rounds: explicit rounds per stage (sequential);
    empty means split `rounds` by `stage_split` ("equal", or "params": proportional to block size).
    lambda1/lambda2: the Mentor's per-block weights; empty means METHOD.md's curriculum
    interpolated to the number of blocks; lambda_scale multiplies both (the knob tuned on the
    clients' validation splits by `python benchmarks/tune.py lambda`). frozen_bn_drift: let frozen blocks' BatchNorm statistics
    move (the reference code's behaviour) instead of running them in eval mode.
    inherit_outputs: when a sequential schedule (NeuLite's or ProFL's) starts stage t+1, start
    Op_{t+1}'s light layers and classifier (or, at the last stage, the real head) from the
    matching layers of Op_t, which stood in for the same blocks, instead of from scratch.
    depthfl_kd_weight: weight of DepthFL's mutual self-distillation (0 = exits learn from labels
    only); depthfl_temperature: the softening of the exits' outputs in its KL terms.
    profl_window: rounds W over which ProFL measures a block's effective movement;
    profl_threshold: the block counts as converged (next stage) once that movement is below it.
    """

    name: str = "neulite"
    rounds: int = 45
    schedule: str = "sequential"
    stage_rounds: tuple[int, ...] = ()
    stage_split: str = "equal"
    mentor: bool = True
    harmonizer: bool = True
    lambda1: tuple[float, ...] = ()
    lambda2: tuple[float, ...] = ()
    lambda_scale: float = 1.0
    sigma: float = 5.0
    frozen_bn_drift: bool = False
    inherit_outputs: bool = False
    depthfl_kd_weight: float = 1.0
    depthfl_temperature: float = 1.0
    profl_window: int = 3
    profl_threshold: float = 0.5

    def __post_init__(self) -> None:
        _choice("method.name", self.name, METHODS)
        _check(self.rounds >= 1, "method.rounds must be >= 1")
        _choice("method.schedule", self.schedule, ("sequential", "cyclic"))
        _choice("method.stage_split", self.stage_split, ("equal", "params"))
        _check(all(r >= 1 for r in self.stage_rounds), "method.stage_rounds entries must be >= 1")
        _check(self.sigma > 0, "method.sigma must be > 0")
        _check(self.lambda_scale >= 0, "method.lambda_scale must be >= 0")
        _check(self.depthfl_kd_weight >= 0, "method.depthfl_kd_weight must be >= 0")
        _check(self.depthfl_temperature > 0, "method.depthfl_temperature must be > 0")
        _check(self.profl_window >= 2, "method.profl_window must be >= 2 (one round has no path to compare)")
        _check(0 < self.profl_threshold <= 1, "method.profl_threshold must be in (0, 1]")


@dataclass(frozen=True)
class ClientsConfig:
    """The federation: how many train each round and how much memory each client has.

    budget = "uniform": MB uniform in budget_mb; "tiers": MB values tiers_mb drawn with
    tier_weights; "fraction": uniform in `fractions` times the full-model training peak;
    "measured": the memory the device has available (on Flower, each node measures its own).
    A round goes on when at least `min_replies` sampled clients return usable results.
    """

    per_round: int = 10
    budget: str = "fraction"
    budget_mb: tuple[float, float] = (100.0, 900.0)
    tiers_mb: tuple[float, ...] = (256.0, 512.0, 1024.0)
    tier_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    fractions: tuple[float, float] = (0.3, 1.1)
    min_replies: int = 1

    def __post_init__(self) -> None:
        _check(self.per_round >= 1, "clients.per_round must be >= 1")
        _check(1 <= self.min_replies <= self.per_round, "clients.min_replies must be between 1 and clients.per_round")
        _choice("clients.budget", self.budget, ("uniform", "tiers", "fraction", "measured"))
        _check(len(self.budget_mb) == 2 and 0 < self.budget_mb[0] <= self.budget_mb[1], "clients.budget_mb must be [low, high] with 0 < low <= high")
        _check(len(self.fractions) == 2 and 0 < self.fractions[0] <= self.fractions[1], "clients.fractions must be [low, high] with 0 < low <= high")
        _check(len(self.tiers_mb) >= 1 and len(self.tiers_mb) == len(self.tier_weights), "clients.tiers_mb and clients.tier_weights must be non-empty and of equal length")
        _check(all(w >= 0 for w in self.tier_weights) and sum(self.tier_weights) > 0, "clients.tier_weights must be non-negative with a positive sum")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1

    def __post_init__(self) -> None:
        _check(self.every >= 1, "eval.every must be >= 1")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(self.clients.per_round <= self.data.num_clients, f"clients.per_round ({self.clients.per_round}) exceeds data.num_clients ({self.data.num_clients})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a TOML value to the field's type, or fail naming the key."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0]
        return tuple(_coerce(key, v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        _check(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise NeuliteError(f"bad config: unknown key {full!r} (valid: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            _check(isinstance(value, dict), f"{full} must be a table")
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, hint)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise NeuliteError(f"bad override {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NeuliteError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise NeuliteError(f"config file {p} is not valid TOML: {exc}") from None
    for item in overrides or []:
        keys, value = _parse_override(item)
        table = raw
        for k in keys[:-1]:
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise NeuliteError(f"bad override {item!r}: {k} is not a section")
        table[keys[-1]] = value
    return _build(Config, raw, "")
