"""Every registered method runs on the Flower driver exactly as in the in-process simulator: the
same rows (stages, eligibility, sampling, bytes) and the same model, bit for bit, through the
strategy, the wire format and the ClientApp (delivered in-process by `LoopbackGrid`)."""

import json

import pytest
import torch

from neulite.algorithms.registry import METHODS
from neulite.config import load_config
from neulite.simulation import run_experiment

pytest.importorskip("flwr")
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from neulite.flower.client_app import load_node, make_client_app  # noqa: E402
from neulite.flower.server_app import run  # noqa: E402
from neulite.flower.simulation import run_config_for  # noqa: E402

from .loopback import LoopbackGrid  # noqa: E402

SMALL = [
    "data.num_clients=4",
    "clients.per_round=3",
    "method.rounds=3",
    "train.local_epochs=1",
    "data.train_size=600",
    "model.width=0.5",
    "eval.every=2",
    "clients.fractions=[0.3, 1.1]",
]


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_flower_as_in_process(tmp_path, monkeypatch, name: str):
    for key in ("_run_id", "_node_id", "_task_id"):  # who is sending: Flower's runtime sets these
        monkeypatch.setattr(TaskIdentity, key, 1)
    cfg = load_config(overrides=[*SMALL, f"method.name={name}"])
    local = run_experiment(cfg, tmp_path / "local")
    load_node.cache_clear()
    run_config = run_config_for(cfg, tmp_path / "flower")
    flower = run(LoopbackGrid(make_client_app(run_config), run_config, cfg.data.num_clients), run_config)
    keys = ("round", "stage", "eligible", "participants", "bytes_down", "bytes_up", "accuracy", "train_loss")
    assert [{k: r[k] for k in keys} for r in _rows(tmp_path / "flower")] == [
        {k: r[k] for k in keys} for r in _rows(tmp_path / "local")
    ]
    for key in ("final_accuracy", "validation_accuracy", "participation", "peak_memory_bytes"):
        assert flower[key] == local[key], key
    a, b = (
        torch.load(tmp_path / "local" / "model.pt", weights_only=True),
        torch.load(tmp_path / "flower" / "model.pt", weights_only=True),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
