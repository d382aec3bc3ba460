"""The experiment config: TOML in, validated dataclasses out, one-line errors for anything wrong.

Every section is a frozen dataclass whose `__post_init__` checks its own values; `load_config`
rejects unknown sections and keys by name. A method's own knobs live in its table
`[method.SECTION]` (e.g. `[method.neulite]`), whose dataclass the method registry names.
`--set section.key=value` overrides use TOML syntax for the value (strings may be left unquoted).
`config_to_toml` writes a config back so that `load_config` reads the same config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from neulite.data.datasets import data_factory
from neulite.errors import NeuliteError
from neulite.models.zoo import model_factory


def check(cond: bool, msg: str) -> None:
    """Fail with a one-line `bad config: msg` unless `cond` (for every section's validation)."""
    if not cond:
        raise NeuliteError(f"bad config: {msg}")


def choice(key: str, value: str, options: tuple[str, ...]) -> None:
    check(value in options, f"{key} = {value!r} is not one of {', '.join(options)}")


def known(key: str, value: str, lookup: Callable[[str], Any]) -> None:
    """`value` names something `lookup` finds (a built-in, a registered name, an import path)."""
    try:
        lookup(value)
    except NeuliteError as exc:
        raise NeuliteError(f"bad config: {key}: {exc}") from None


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
        known("data.name", self.name, data_factory)
        check(self.num_clients >= 1, "data.num_clients must be >= 1")
        choice("data.partition", self.partition, ("iid", "dirichlet", "shards"))
        check(self.alpha > 0, "data.alpha must be > 0")
        check(self.shards_per_client >= 1, "data.shards_per_client must be >= 1")
        check(0 <= self.val_fraction < 1, "data.val_fraction must be in [0, 1)")
        choice("data.on_small", self.on_small, ("error", "clamp"))
        choice("data.augment", self.augment, ("auto", "on", "off"))
        check(self.train_size >= 0, "data.train_size must be >= 0 (0 = the whole training set)")


@dataclass(frozen=True)
class ModelConfig:
    """name: a built-in network, a registered one or an import path "module:function"; width:
    channel multiplier; blocks: 0 = the network's own blocks, N > 0 = N memory-balanced blocks,
    "auto" = the fewest memory-balanced blocks for which a share `plan_share` of the clients' budgets
    fits every stage (`neulite.planner`; recomputation counts unless train.recompute = "off")."""

    name: str = "small_cnn"
    width: float = 1.0
    blocks: int | str = 0
    plan_share: float = 0.9

    def __post_init__(self) -> None:
        known("model.name", self.name, model_factory)
        check(self.width > 0, "model.width must be > 0")
        check(
            self.blocks == "auto"
            or (isinstance(self.blocks, int) and not isinstance(self.blocks, bool) and self.blocks >= 0),
            f'model.blocks must be "auto" or an integer >= 0, got {self.blocks!r}',
        )
        check(0 < self.plan_share <= 1, f"model.plan_share must be in (0, 1], got {self.plan_share!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a client, the same for every method.

    prefix_cache_mb: the most MiB of frozen-prefix outputs (`neulite.prefix_cache`) that a process
    serving clients keeps between rounds; 0 turns the cache off. It changes no result, only time.
    recompute (the NeuLite methods): "off"; "on", every client recomputes what it trains in backward
    instead of keeping its activations (less memory, more time, the same result); "auto", only a
    client whose budget needs it to fit the stage does.
    """

    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    prefix_cache_mb: float = 1024.0
    recompute: str = "off"

    def __post_init__(self) -> None:
        check(self.local_epochs >= 1, "train.local_epochs must be >= 1")
        check(self.batch_size >= 2, "train.batch_size must be >= 2 (BatchNorm needs two samples)")
        check(self.lr > 0, "train.lr must be > 0")
        check(0 <= self.momentum < 1, "train.momentum must be in [0, 1)")
        check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        check(self.prefix_cache_mb >= 0, "train.prefix_cache_mb must be >= 0 (0: no prefix cache)")
        choice("train.recompute", self.recompute, ("off", "on", "auto"))


@dataclass(frozen=True)
class MethodConfig:
    """Which algorithm, for how many communication rounds, and every method's own knobs.

    `sections` holds one validated options record per registered `[method.SECTION]` table (the
    defaults where the config gives none), so a config can be run with any method; a method
    reads its own with `section(name)`.
    """

    name: str = "neulite-elastic"
    rounds: int = 45
    sections: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # imported here: the registry imports every method, and the methods import this module
        from neulite.algorithms.registry import METHODS, SECTIONS

        choice("method.name", self.name, tuple(METHODS))
        check(self.rounds >= 1, "method.rounds must be >= 1")
        given = dict(self.sections)
        unknown = sorted(set(given) - set(SECTIONS))
        check(not unknown, f"unknown table [method.{unknown[0] if unknown else ''}] (valid: {', '.join(SECTIONS)})")
        for key, options in given.items():
            check(isinstance(options, SECTIONS[key]), f"[method.{key}] must be a {SECTIONS[key].__name__}")
        object.__setattr__(self, "sections", tuple((key, given.get(key, cls())) for key, cls in SECTIONS.items()))

    def section(self, name: str) -> Any:
        """The options of the `[method.NAME]` table."""
        return dict(self.sections)[name]

    def with_section(self, name: str, **changes: Any) -> MethodConfig:
        """A copy with some of `[method.NAME]`'s options changed."""
        sections = dict(self.sections)
        sections[name] = dataclasses.replace(sections[name], **changes)
        return dataclasses.replace(self, sections=tuple(sections.items()))


@dataclass(frozen=True)
class ClientsConfig:
    """The federation: how many train each round and how much memory each client has.

    budget = "uniform": MB uniform in budget_mb; "tiers": MB values tiers_mb drawn with
    tier_weights; "fraction": uniform in `fractions` times the full-model training peak;
    "measured": the memory the device has available (on Flower, each node measures its own).
    `enforce_budgets` trains each sampled client as a device of its budget would (a fresh process
    the OS holds to it, `neulite.federation.train_on_device`): one that needs more fails, as it
    would on the device, instead of silently using more. A round goes on when at least
    `min_replies` sampled clients return usable results.
    """

    per_round: int = 10
    budget: str = "fraction"
    budget_mb: tuple[float, float] = (100.0, 900.0)
    tiers_mb: tuple[float, ...] = (256.0, 512.0, 1024.0)
    tier_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    fractions: tuple[float, float] = (0.3, 1.1)
    min_replies: int = 1
    enforce_budgets: bool = False

    def __post_init__(self) -> None:
        check(self.per_round >= 1, "clients.per_round must be >= 1")
        check(1 <= self.min_replies <= self.per_round, "clients.min_replies must be between 1 and clients.per_round")
        choice("clients.budget", self.budget, ("uniform", "tiers", "fraction", "measured"))
        check(
            len(self.budget_mb) == 2 and 0 < self.budget_mb[0] <= self.budget_mb[1],
            "clients.budget_mb must be [low, high] with 0 < low <= high",
        )
        check(
            len(self.fractions) == 2 and 0 < self.fractions[0] <= self.fractions[1],
            "clients.fractions must be [low, high] with 0 < low <= high",
        )
        check(
            len(self.tiers_mb) >= 1 and len(self.tiers_mb) == len(self.tier_weights),
            "clients.tiers_mb and clients.tier_weights must be non-empty and of equal length",
        )
        check(
            all(w >= 0 for w in self.tier_weights) and sum(self.tier_weights) > 0,
            "clients.tier_weights must be non-negative with a positive sum",
        )


@dataclass(frozen=True)
class ServerConfig:
    """How the server merges replies it does not trust.

    aggregation: "mean" (data-size weighted), or per tensor element over the clients that hold it,
    "trimmed_mean" (drop the `trim` share of the largest and of the smallest values, average the rest)
    or "median"; both robust rules weigh every client equally, so a claimed sample count moves nothing.
    outlier_ratio: a reply whose update (its RMS distance from the tensors it was sent) is more than
    this many times the sent model's RMS, or than the median update of the round's clients that
    trained the same tensors (with 3 or more of them), is left out (0: off). Honest clients on
    label-skewed data differ by more than 10x; 100 leaves them be.
    """

    aggregation: str = "mean"
    trim: float = 0.2
    outlier_ratio: float = 100.0

    def __post_init__(self) -> None:
        choice("server.aggregation", self.aggregation, ("mean", "trimmed_mean", "median"))
        check(0 <= self.trim < 0.5, "server.trim must be in [0, 0.5)")
        check(self.outlier_ratio == 0 or self.outlier_ratio > 1, "server.outlier_ratio must be 0 (off) or > 1")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1

    def __post_init__(self) -> None:
        check(self.every >= 1, "eval.every must be >= 1")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check(
            isinstance(self.seed, int) and 0 <= self.seed < 2**32,
            f"seed must be an integer in [0, 2**32), got {self.seed!r}",
        )
        check(
            self.clients.per_round <= self.data.num_clients,
            f"clients.per_round ({self.clients.per_round}) exceeds data.num_clients ({self.data.num_clients})",
        )

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values, as the TOML file has them (method sections as `method.SECTION` tables)."""
        out = dataclasses.asdict(self)
        out["method"].update(dict(out["method"].pop("sections")))
        return out

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a TOML value to the field's type, or fail naming the key."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        check(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0]
        return tuple(_coerce(key, v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        check(math.isfinite(number), f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        check(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    return value


def replace_checked(record: Any, changes: dict[str, Any], prefix: str) -> Any:
    """`dataclasses.replace` with values from outside the config file (a task's settings), each
    checked and converted as the file's are (`_coerce`), naming `prefix + key` when one is wrong."""
    hints = typing.get_type_hints(type(record))
    return dataclasses.replace(record, **{key: _coerce(prefix + key, v, hints[key]) for key, v in changes.items()})


def _build_method(raw: dict[str, Any]) -> MethodConfig:
    from neulite.algorithms.registry import SECTIONS

    plain = {k: v for k, v in raw.items() if k not in SECTIONS}
    sections = []
    for key, cls in SECTIONS.items():
        if key in raw:
            check(isinstance(raw[key], dict), f"method.{key} must be a table")
            sections.append((key, _build(cls, raw[key], f"method.{key}.")))
    for key in plain:
        owners = [name for name, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        check(
            key in ("name", "rounds") or not owners,
            f"unknown key 'method.{key}' (did you mean method.{owners[0] if owners else ''}.{key}?)",
        )
    return _build(MethodConfig, plain, "method.", extra=tuple(SECTIONS), sections=tuple(sections))


def _build(cls: type, raw: dict[str, Any], prefix: str, extra: tuple[str, ...] = (), **fixed: Any) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    kwargs: dict[str, Any] = dict(fixed)
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise NeuliteError(f"bad config: unknown key {full!r} (valid: {', '.join(sorted(names | set(extra)))})")
        hint = hints[key]
        if hint is MethodConfig:
            check(isinstance(value, dict), f"{full} must be a table")
            kwargs[key] = _build_method(value)
        elif dataclasses.is_dataclass(hint):
            check(isinstance(value, dict), f"{full} must be a table")
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
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise NeuliteError(f"config file {p} is not UTF-8 text") from None
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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def _toml_table(name: str, table: dict[str, Any]) -> str:
    plain = "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items() if not isinstance(v, dict))
    head = f"\n[{name}]\n" if name else ""
    nested = "".join(_toml_table(f"{name}.{k}" if name else k, v) for k, v in table.items() if isinstance(v, dict))
    return head + plain + nested


def setting_for(tree: dict[str, Any], sections: Collection[str]) -> dict[str, Any]:
    """A `Config.to_dict()` tree without the `[method.SECTION]` tables other than `sections`: the
    setting a run depends on when its method reads only those (a finished FedAvg run stays valid
    when NeuLite's knobs change)."""
    method = {key: value for key, value in tree["method"].items() if not isinstance(value, dict) or key in sections}
    return {**tree, "method": method}


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "", defaults: Any = None) -> list[str]:
    """The dotted keys whose values differ between two `Config.to_dict()` trees. A key one tree
    lacks is a setting added to neulite since it was written: it differs only where the other tree
    holds something other than its default (so results and checkpoints outlive new options)."""
    if defaults is None:
        defaults = Config().to_dict()
    keys = dict.fromkeys([*a, *b])
    out = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_differences(x, y, f"{prefix}{key}.", default)
        elif key not in a or key not in b:
            if json.dumps(y if key not in a else x) != json.dumps(default):
                out.append(f"{prefix}{key}")
        elif json.dumps(x) != json.dumps(y):  # a list read back from JSON equals the tuple it was
            out.append(f"{prefix}{key}")
    return out


def config_to_toml(cfg: Config) -> str:
    """The config as a TOML file that `load_config` reads back to an equal config."""
    return _toml_table("", cfg.to_dict())
