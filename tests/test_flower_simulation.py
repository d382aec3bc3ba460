"""Flower's simulation engine (Ray) runs the same core as the in-process simulator: same sampling,
same bytes, same accuracy, on a user's own network and data named by import path. Everything else about the Flower driver (every method bit for bit,
failing, hung and hostile nodes) is tested without Ray in test_flower_methods.py."""

import json
from pathlib import Path

import pytest
import torch

from neulite.config import load_config
from neulite.simulation import run_experiment

pytest.importorskip("flwr")
from neulite.flower.simulation import simulate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.name=examples.own_model:digits_cnn",
    "data.name=examples.own_model:digits",
    "data.num_clients=4",
    "clients.per_round=3",
    "method.rounds=3",
    "clients.fractions=[0.5, 1.1]",
    "train.local_epochs=1",
]

pytestmark = pytest.mark.slow  # starts Ray


def _rows(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k in ("round", "stage", "eligible", "participants", "bytes_down", "bytes_up")}
        for r in rows
    ]


def test_flower_simulation_matches_the_in_process_simulator(tmp_path, monkeypatch):
    """On Ray, NeuLite (every method's Flower path is checked bit for bit, without Ray, in
    test_flower_methods.py); every Ray worker imports the user's module from the working directory."""
    monkeypatch.chdir(REPO)
    cfg = load_config(overrides=SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray's workers train single-threaded; match them for comparable floating point
    try:
        local = run_experiment(cfg, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    flower = simulate(cfg, tmp_path / "flower")
    assert _rows(tmp_path / "flower") == _rows(tmp_path / "local")  # same stages, eligibility, sampling and bytes
    assert abs(flower["final_accuracy"] - local["final_accuracy"]) <= 0.01
    assert abs(flower["validation_accuracy"] - local["validation_accuracy"]) <= 0.01
    assert flower["final_accuracy"] > 0.2  # it learns: chance is 0.1
    assert flower["participation"] == local["participation"] and flower["driver"] == "flower"
    for name in ("metrics.csv", "model.pt", "accuracy.png", "memory.png", "checkpoint.pt"):
        assert (tmp_path / "flower" / name).is_file()
