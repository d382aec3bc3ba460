import json
from pathlib import Path

import pytest

from neulite.config import Config, config_differences, config_to_toml, load_config
from neulite.errors import NeuliteError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(
        overrides=[
            "train.lr=0.1",
            "method.neulite.stage_rounds=[1, 2, 3]",
            "data.name=digits",
            "method.neulite.mentor=false",
        ]
    )
    assert cfg.train.lr == 0.1
    assert cfg.method.section("neulite").stage_rounds == (1, 2, 3)
    assert cfg.data.name == "digits"
    assert cfg.method.section("neulite").mentor is False
    assert cfg.method.section("depthfl").kd_weight == 1.0  # sections not given keep their defaults


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'"),
        ("trian.lr=0.1", "unknown key 'trian'"),
        ("train.lr=abc", "train.lr must be a number"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("method.name=fedprox", "method.name = 'fedprox' is not one of"),
        ("data.partition=zipf", "data.partition"),
        ("train.batch_size=1", "train.batch_size must be >= 2"),
        ("method.neulite.mentor=1", "method.neulite.mentor must be true or false"),
        ("method.neulite.sigmaa=1", "unknown key 'method.neulite.sigmaa'"),
        ("method.mentor=false", "unknown key 'method.mentor' (did you mean method.neulite.mentor?)"),
        ("method.fedprox.mu=0.1", "unknown key 'method.fedprox'"),
        ("method.depthfl.temperature=0", "method.depthfl.temperature must be > 0"),
        ("method.profl.window=1", "method.profl.window must be >= 2"),
        ("clients.per_round=50", "exceeds data.num_clients"),
        ("noequals", "expected section.key=value"),
    ],
)
def test_bad_values_are_one_line_errors(override: str, fragment: str):
    with pytest.raises(NeuliteError) as exc:
        load_config(overrides=[override])
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(NeuliteError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(NeuliteError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config(
        overrides=["method.neulite.lambda1=[0.4, 0.2, 0.0]", "data.root=/x y", "method.profl.threshold=0.25"]
    )
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert "[method.profl]\nwindow = 3\nthreshold = 0.25\n" in path.read_text()
    assert load_config(path) == cfg
    assert load_config(path) != Config()


def test_shipped_configs_load():
    assert load_config(ROOT / "configs" / "default.toml") == Config()
    ref = load_config(ROOT / "configs" / "reference-resnet34-cifar10.toml")
    assert ref.model.name == "resnet34" and ref.data.name == "cifar10" and ref.data.num_clients == 100


def test_a_setting_written_before_an_option_existed_matches_it_at_its_default():
    written = json.loads(json.dumps(Config().to_dict()))  # as a results file holds it: lists, not tuples
    del written["clients"]["enforce_budgets"]  # an option added since
    assert config_differences(written, Config().to_dict()) == []
    enforced = load_config(overrides=["clients.enforce_budgets=true", "method.rounds=7"]).to_dict()
    assert config_differences(written, enforced) == ["method.rounds", "clients.enforce_budgets"]
