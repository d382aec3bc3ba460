"""A user's own network and data set: the public API, the registry and import paths, through every
driver; and a clear one-line error for each way a user's model or data can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from torch import nn

import neulite
from examples import own_model
from neulite.cli import main
from neulite.config import load_config
from neulite.data import from_arrays, load_dataset, partition
from neulite.errors import NeuliteError
from neulite.models.zoo import build_model

REPO = Path(__file__).resolve().parents[1]
USER = ["model.name=examples.own_model:digits_cnn", "data.name=examples.own_model:digits"]


def test_the_example_trains_a_user_network_on_user_data_with_neulite_and_exclusivefl(tmp_path: Path):
    out = tmp_path / "own"
    own_model.main(["--rounds", "3", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"neulite", "exclusivefl"}
    assert summary["methods"]["neulite"]["final_accuracy_mean"] > 0.3, "10 classes: chance is 0.1"
    assert summary["methods"]["neulite"]["participation"] > summary["methods"]["exclusivefl"]["participation"]
    for method in ("neulite", "exclusivefl"):
        run = tomllib.loads((out / "runs" / method / "seed0" / "config.toml").read_text())
        assert (run["model"]["name"], run["data"]["name"]) == ("digits_cnn", "digits_arrays")  # what was used


def test_the_cli_trains_and_compares_a_user_network_named_by_import_path(tmp_path: Path, monkeypatch):
    """The end-to-end run of the `neulite` command, on a network and data set it was not built around."""
    monkeypatch.chdir(REPO)  # import paths resolve from the current directory, as `python -m` does
    out = tmp_path / "run"
    run = [
        *USER,
        "data.num_clients=8",
        "clients.per_round=3",
        "method.rounds=6",
        "train.local_epochs=1",
        "eval.every=3",
    ]
    assert main(["run", "--quiet", "--out", str(out), *(a for o in run for a in ("--set", o))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.4, "10 classes: chance is 0.1"
    assert summary["rounds"] == 6 and summary["wall_seconds"] > 0 and 0 < summary["participation"] <= 1
    for name in (
        "config.toml",
        "metrics.jsonl",
        "metrics.csv",
        "model.pt",
        "accuracy.png",
        "memory.png",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    recorded = load_config(out / "config.toml")
    assert (recorded.model.name, recorded.data.name) == ("examples.own_model:digits_cnn", "examples.own_model:digits")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 3, 3]
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(k.startswith(("blocks.", "head.")) for k in state), "only the deployable model, no scaffolding"
    compare = [*USER, "data.num_clients=6", "clients.per_round=2", "method.rounds=2", "train.local_epochs=1"]
    cmp = ["compare", "--quiet", "--methods", "fedavg", "--out", str(tmp_path / "cmp")]
    assert main([*cmp, *(a for o in compare for a in ("--set", o))]) == 0
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["methods"]["fedavg"]["final_accuracy_mean"] > 0


def _cnn(input_shape, num_classes, width=1.0):
    c = max(1, round(8 * width))
    block = nn.Sequential(nn.Conv2d(input_shape[0], c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
    return neulite.BlockModel([block], neulite.ClassifierHead(c, num_classes), input_shape, num_classes)


def _tied(input_shape, num_classes, in_head=False):
    """Two blocks, or a block and the head, holding one layer (weight tying)."""
    conv = nn.Conv2d(input_shape[0], input_shape[0], 3, padding=1)
    first = nn.Sequential(nn.Conv2d(input_shape[0], input_shape[0], 1)) if in_head else nn.Sequential(conv)
    head = nn.Sequential(conv, neulite.ClassifierHead(input_shape[0], num_classes)) if in_head else None
    blocks = [first, nn.Sequential(conv)]
    return neulite.BlockModel(
        blocks, head or neulite.ClassifierHead(input_shape[0], num_classes), input_shape, num_classes
    )


def test_a_registered_model_and_data_set_build_by_name_and_others_fail_naming_the_choices():
    neulite.register_model("tiny_user_cnn")(_cnn)
    neulite.register_dataset("tiny_user_data")(lambda root, seed: from_arrays(np.zeros((20, 4, 4)), np.arange(20) % 2))
    cfg = load_config(overrides=["model.name=tiny_user_cnn", "data.name=tiny_user_data"])
    model = build_model(cfg.model.name, (1, 4, 4), 2)
    assert isinstance(model, neulite.BlockModel) and model.block_shapes == [(8, 4, 4)]
    assert load_dataset("tiny_user_data").name == "tiny_user_data"
    with pytest.raises(
        NeuliteError, match=r"unknown model 'nope'.*small_cnn.*registered: .*tiny_user_cnn.*import path"
    ):
        load_config(overrides=["model.name=nope"])
    with pytest.raises(NeuliteError, match=r"unknown data set 'nope'.*mnist5k.*tiny_user_data.*import path"):
        load_config(overrides=["data.name=nope"])
    with pytest.raises(NeuliteError, match="not a built-in"):
        neulite.register_model("resnet18")
    with pytest.raises(NeuliteError, match="without ':'"):
        neulite.register_dataset("a:b")


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("no_such_module_xyz:f", "no module 'no_such_module_xyz'"),
        ("examples.own_model:nothing", "has no 'nothing'"),
        ("examples.own_model:", "is not an import path"),
        ("math:pi", "is a float, not a function"),
    ],
)
def test_a_bad_import_path_is_a_one_line_config_error(path: str, fragment: str, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(NeuliteError, match="bad config: model.name") as exc:
        load_config(overrides=[f"model.name={path}"])
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_a_module_that_fails_on_import_names_its_own_error(tmp_path: Path, monkeypatch):
    (tmp_path / "broken_user_mod.py").write_text("import not_installed_dep\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NeuliteError, match="importing 'broken_user_mod' failed: No module named 'not_installed_dep'"):
        load_config(overrides=["data.name=broken_user_mod:load"])


@pytest.mark.parametrize(
    "factory, fragment",
    [
        (lambda s, k, w: nn.Sequential(nn.Flatten(), nn.Linear(16, k)), "must return a neulite BlockModel"),
        (lambda s, k, w: _cnn(s, k + 1, w), "and 3 classes but built .* and 4"),
        (lambda s, k, w: 1 / 0, "failed to build .*ZeroDivisionError"),
        (lambda s, k, w: neulite.BlockModel([nn.Linear(3, 3)], nn.Identity(), s, k), "model cannot be split"),
        (lambda s, k, w: _cnn(s, k, w).double(), "holds blocks.0.0.weight as torch.float64: .* float32"),
        (lambda s, k, w: _tied(s, k), r"blocks.0.0.weight and blocks.1.0.weight are one parameter, shared by block 1"),
        (lambda s, k, w: _tied(s, k, in_head=True), "blocks.1.0.weight and head.0.weight .* block 2 and the head"),
    ],
)
def test_a_user_model_that_is_not_what_neulite_needs_is_refused_naming_why(factory, fragment: str):
    neulite.register_model("bad_user_cnn")(factory)
    with pytest.raises(NeuliteError, match=fragment):
        build_model("bad_user_cnn", (1, 4, 4), 3)


class _ReluInPlace(nn.Module):
    def forward(self, x):
        return x.relu_()


def _preact(input_shape, num_classes, width=1.0, act=lambda: nn.ReLU(inplace=True)):
    """Pre-activation blocks, torchvision style: each starts with an in-place ReLU of the block before's output."""
    c = max(1, round(8 * width))
    blocks = [nn.Sequential(nn.Conv2d(input_shape[0], c, 3, padding=1), nn.BatchNorm2d(c))]
    blocks += [nn.Sequential(act(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)) for _ in range(2)]
    head = nn.Sequential(nn.ReLU(inplace=True), neulite.ClassifierHead(c, num_classes))
    return neulite.BlockModel(blocks, head, input_shape, num_classes)


def test_blocks_that_change_their_input_in_place_train_out_of_place_or_are_refused(tmp_path: Path):
    """A block's input also feeds the output modules, the Mentor and DepthFL's exits: an in-place ReLU
    there broke every client's backward ("modified by an inplace operation")."""
    model = _preact((1, 8, 8), 10)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    neulite.register_model("preact_user_cnn")(_preact)
    small = [
        "data.name=digits",
        "data.train_size=400",
        "data.num_clients=4",
        "clients.per_round=4",
        "train.local_epochs=1",
        "eval.every=3",
    ]
    for method, recompute in (("depthfl", "off"), ("neulite", "on")):
        overrides = [*small, "model.name=preact_user_cnn", f"method.name={method}", f"train.recompute={recompute}"]
        summary = neulite.run_experiment(
            load_config(overrides=[*overrides, "method.rounds=3", "clients.fractions=[3.0, 4.0]"]), tmp_path / method
        )
        assert summary["participation"] == 1.0, method  # every client trained: none failed its backward
    with pytest.raises(NeuliteError, match=r"block 2, block 3: the forward changes its input in place .* out of place"):
        _preact((1, 8, 8), 10, act=_ReluInPlace)


def _pooling_block(input_shape, num_classes, width=1.0):
    """A middle block of nothing but pooling: nothing there for the Harmonizer to keep trainable."""
    c = max(1, round(8 * width))
    blocks = [nn.Sequential(nn.Conv2d(input_shape[0], c, 3, padding=1), nn.ReLU()), nn.Sequential(nn.MaxPool2d(2))]
    blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()))
    return neulite.BlockModel(blocks, neulite.ClassifierHead(c, num_classes), input_shape, num_classes)


def test_a_block_without_layers_is_refused_by_name_before_the_run_and_trains_without_the_harmonizer(tmp_path: Path):
    neulite.register_model("pooling_user_cnn")(_pooling_block)
    small = ["model.name=pooling_user_cnn", "data.name=digits", "data.train_size=300", "data.num_clients=3"]
    small += ["clients.per_round=3", "method.rounds=3", "train.local_epochs=1", "clients.fractions=[3.0, 4.0]"]
    with pytest.raises(NeuliteError, match=r"block 2 has no conv or linear layer.*harmonizer = false"):
        neulite.run_experiment(load_config(overrides=small), tmp_path / "harmonized")
    assert not (tmp_path / "harmonized").exists()  # refused before the results folder was made
    summary = neulite.run_experiment(
        load_config(overrides=[*small, "method.neulite.harmonizer=false"]), tmp_path / "plain"
    )
    assert summary["participation"] == 1.0


def _register_data(splits_fn) -> str:
    neulite.register_dataset("bad_user_data")(splits_fn)
    return "bad_user_data"


@pytest.mark.parametrize(
    "loader, fragment",
    [
        (lambda root, seed: (np.zeros((4, 8, 8)), np.zeros(4)), "must return a neulite DataSplits"),
        (lambda root, seed: Path("/nonexistent/user/data").read_bytes(), "failed to load: FileNotFoundError"),
    ],
)
def test_a_user_data_set_that_is_not_data_splits_is_refused_naming_why(loader, fragment: str):
    with pytest.raises(NeuliteError, match=fragment):
        load_dataset(_register_data(loader))


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ((np.zeros((4, 1, 2, 2, 2)), np.zeros(4, dtype=int)), r"x_train must be a non-empty numeric array of images"),
        ((np.full((4, 2, 2), np.nan), np.zeros(4, dtype=int)), "x_train holds NaN"),
        ((np.zeros((4, 2, 2)), np.array([0.0, 1.0, 0.0, 1.0])), "y_train must be 4 non-negative integer labels"),
        ((np.zeros((4, 2, 2)), np.array([0, -1, 0, 1])), "non-negative integer labels"),
        ((np.zeros((4, 2, 2)), np.zeros(3, dtype=int)), "y_train must be 4"),
        ((np.zeros((4, 2, 2)), np.zeros(4, dtype=int), np.zeros((2, 3, 3))), "give both x_test and y_test"),
        ((np.zeros((4, 2, 2)), np.arange(4) % 2, np.zeros((2, 3, 3)), np.zeros(2, dtype=int)), "test samples are"),
        ((np.zeros((4, 2, 2)), np.arange(4) % 2, np.zeros((2, 2, 2)), np.array([0, 7])), "a test label"),
        ((np.zeros((4, 2, 2)), np.zeros(4, dtype=int)), "num_classes must be an integer >= 2"),
    ],
)
def test_from_arrays_refuses_bad_arrays_naming_the_problem(arrays, fragment: str):
    with pytest.raises(NeuliteError, match=fragment):
        from_arrays(*arrays)


def test_from_arrays_normalises_per_channel_and_splits_stratified():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(100, 2, 5, 5)).astype(np.uint8)
    y = np.repeat([0, 1, 2, 3], 25)
    splits = from_arrays(x, y, test_fraction=0.2, seed=3, augment=True)
    assert splits.input_shape == (2, 5, 5) and splits.augment and splits.train.num_classes == 4
    assert len(splits.train) == 80 and len(splits.test) == 20
    assert torch.equal(torch.bincount(splits.test.y), torch.tensor([5, 5, 5, 5]))
    std, mean = torch.std_mean(splits.train.x, dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros(2), atol=1e-5) and torch.allclose(std, torch.ones(2), atol=1e-5)
    again = from_arrays(torch.from_numpy(x), torch.from_numpy(y), test_fraction=0.2, seed=3)
    assert torch.equal(again.test.x, splits.test.x)  # tensors or arrays, the same seed gives the same split


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitioners_take_a_user_label_array_with_the_same_options(scheme: str):
    labels = np.array([7] * 60 + [2] * 30 + [5] * 10)  # any integer labels, any class balance
    shards = partition(labels, 4, scheme, 0, alpha=0.3, shards_per_client=2, min_size=8, on_small="clamp")
    assert sorted(np.concatenate(shards).tolist()) == list(range(100))
    assert all(len(s) >= 8 for s in shards)


def test_flower_refuses_a_name_registered_only_in_this_process(tmp_path: Path):
    pytest.importorskip("flwr")
    from neulite.flower.simulation import run_config_for

    neulite.register_model("only_here_cnn")(_cnn)
    cfg = load_config(overrides=["model.name=only_here_cnn"])
    with pytest.raises(NeuliteError, match="registered in this process only.*import path"):
        run_config_for(cfg, tmp_path / "flower")
    assert not (tmp_path / "flower").exists()
