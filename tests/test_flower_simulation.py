"""Flower's simulation engine runs the same core as the in-process simulator: same sampling, same
bytes, same accuracy; faulty nodes are left out of a round and too few usable replies stop the run."""

import json
import time

import pytest
import torch

from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.simulation import run_experiment

pytest.importorskip("flwr")
from flwr.app import ArrayRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from neulite.flower.client_app import make_client_app  # noqa: E402
from neulite.flower.server_app import make_server_app  # noqa: E402
from neulite.flower.simulation import run_config_for, simulate  # noqa: E402

SMALL = ["data.num_clients=6", "clients.per_round=3", "method.rounds=3", "clients.fractions=[0.5, 1.1]"]
HANG_SECONDS = 40.0
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}

pytestmark = pytest.mark.slow  # every test here starts Ray


def _rows(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k in ("round", "stage", "eligible", "participants", "bytes_down", "bytes_up")}
        for r in rows
    ]


@pytest.mark.parametrize("name", ["neulite", "heterofl"])
def test_flower_simulation_matches_the_in_process_simulator(tmp_path, name: str):
    """On Ray: NeuLite, and HeteroFL, whose evaluations query every node for BatchNorm statistics."""
    cfg = load_config(overrides=[*SMALL, f"method.name={name}"])
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


def _faulty(run_config: dict, faults: dict[int, str], from_round: int = 1) -> ClientApp:
    """The real ClientApp, except that the partitions in `faults` misbehave in training from `from_round` on."""
    real = make_client_app(run_config)
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return real(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rnd = msg.content.config_records["config"]["round"]
        fault = faults.get(int(context.node_config["partition-id"])) if rnd >= from_round else None
        if fault == "error":
            raise RuntimeError("device out of memory")
        if fault == "hang" and rnd == from_round:
            time.sleep(HANG_SECONDS)
        reply = real(msg, context)
        arrays = dict(reply.content.array_records["arrays"].to_torch_state_dict())
        name = next(n for n in arrays if arrays[n].is_floating_point())
        if fault == "nan":
            arrays[name] = torch.full_like(arrays[name], float("nan"))
        elif fault == "shape":
            arrays[name] = torch.zeros(7)
        reply.content.array_records["arrays"] = ArrayRecord(torch_state_dict=arrays)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return real(msg, context)

    return app


def test_faulty_nodes_are_left_out_and_too_few_replies_stop_the_run(tmp_path):
    faults = {1: "nan", 2: "shape", 3: "error", 4: "hang"}
    overrides = [
        "data.num_clients=5",
        "clients.per_round=5",
        "method.rounds=2",
        "clients.fractions=[1.2, 1.3]",
        "method.name=fedavg",
    ]
    run_config = {
        **run_config_for(load_config(overrides=overrides), tmp_path / "ok"),
        "round-timeout": HANG_SECONDS / 2,
    }
    run_simulation(make_server_app(run_config), _faulty(run_config, faults), num_supernodes=5, backend_config=BACKEND)
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    # round 1: only partition 0's reply is used (4 timed out); in round 2 partition 4 may still be busy
    first, second = (r["participants"] for r in _rows(tmp_path / "ok"))
    assert first == 1 and second in (1, 2)
    assert summary["participation"] in (0.2, 0.4) and summary["final_accuracy"] > 0.1

    faults = {1: "nan", 2: "shape", 3: "error"}
    overrides = [
        "data.num_clients=4",
        "clients.per_round=4",
        "method.rounds=3",
        "clients.fractions=[1.2, 1.3]",
        "method.name=fedavg",
        "clients.min_replies=2",
    ]
    run_config = run_config_for(load_config(overrides=overrides), tmp_path / "stop")
    with pytest.raises(
        NeuliteError, match="round 2: 1 of 4 sampled clients returned a usable result, fewer than clients.min_replies=2"
    ):
        run_simulation(
            make_server_app(run_config),
            _faulty(run_config, faults, from_round=2),
            num_supernodes=4,
            backend_config=BACKEND,
        )
    assert not (tmp_path / "stop" / "summary.json").exists()
    assert [r["participants"] for r in _rows(tmp_path / "stop")] == [4]  # round 1 is kept, checkpointed

    resumed = {**run_config, "resume": True}  # the nodes recover: the run continues after round 1
    run_simulation(make_server_app(resumed), make_client_app(resumed), num_supernodes=4, backend_config=BACKEND)
    assert [r["participants"] for r in _rows(tmp_path / "stop")] == [4, 4, 4]
    assert json.loads((tmp_path / "stop" / "summary.json").read_text())["rounds"] == 3
