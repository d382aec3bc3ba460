import json
import platform
import shutil
from pathlib import Path

import pytest

from neulite.cli import main
from neulite.compare import LATE_EVALUATIONS, _hosts, _to_target, late_accuracy

TINY = [  # the table, the target and resuming are tested, not learning: few samples, split evenly
    "--set",
    "data.train_size=600",
    "--set",
    "data.partition=iid",
    "--set",
    "data.num_clients=6",
    "--set",
    "clients.per_round=3",
    "--set",
    "train.local_epochs=1",
    "--set",
    "method.rounds=3",
    "--set",
    "clients.fractions=[0.5, 1.5]",
    "--set",
    "data.name=digits",
    "--set",
    "model.width=0.5",
]


def test_compare_writes_the_table_and_resumes_without_rerunning(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cmp"
    argv = ["compare", "--quiet", "--methods", "exclusivefl,neulite", "--seeds", "0,1", "--out", str(out), *TINY]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"exclusivefl", "neulite"}
    for row in summary["methods"].values():
        assert {"final_accuracy_mean", "late_accuracy_mean", "participation", "peak_memory_bytes"} <= row.keys()
        assert len(row["final_accuracies"]) == 2
    assert all(0 < row["participation"] <= 1 for row in summary["methods"].values())
    assert summary["methods"]["exclusivefl"]["peak_memory_bytes"] > summary["methods"]["neulite"]["peak_memory_bytes"]
    assert summary["target_accuracy"] == pytest.approx(
        sorted(summary["methods"]["exclusivefl"]["final_accuracies"])[0] / 2
        + sorted(summary["methods"]["exclusivefl"]["final_accuracies"])[1] / 2
    )
    for name in ("comparison.md", "comparison.csv", "accuracy.png"):
        assert (out / name).is_file()
    assert all(row["hosts"] == [platform.platform()] for row in summary["methods"].values())  # whose clock
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/model.pt")}
    assert len(stamps) == 4
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/model.pt")} == stamps, "finished runs are not run again"
    capsys.readouterr()
    assert main([*argv, "--set", "train.lr=0.01"]) == 2
    assert "holds a comparison with another train.lr" in capsys.readouterr().err

    tuned = [
        *argv,
        "--set",
        "method.neulite.stage_epochs=[2, 1, 1]",
    ]  # NeuLite's own knob: ExclusiveFL's runs stay valid
    assert main(tuned) == 2
    assert "runs/neulite/seed0 finished with another method.neulite.stage_epochs" in capsys.readouterr().err
    for seed in (0, 1):
        shutil.rmtree(out / "runs" / "neulite" / f"seed{seed}")
    assert main(tuned) == 0
    kept = {p: p.stat().st_mtime_ns for p in out.glob("runs/exclusivefl/*/model.pt")}
    assert kept == {p: t for p, t in stamps.items() if "exclusivefl" in str(p)}
    assert json.loads((out / "runs" / "neulite" / "seed0" / "summary.json").read_text())["stage_epochs"] == [2, 1, 1]


def test_a_methods_hosts_are_its_rounds_machines_each_once():
    recorded, older = [{"host": "b"}, {"host": "a"}], [{"host": "a"}, {}]  # a round from before rounds named it
    assert _hosts([recorded, older]) == ["a", "b", "not recorded"]
    assert _hosts([[{"host": 7}, {"host": "a"}]]) == ["7", "a"]  # an edited file: shown, not a crash


def test_late_accuracy_averages_the_last_evaluations_only():
    nan = float("nan")
    early = [{"accuracy": 0.0}, {"accuracy": nan}] * 3
    late = [{"accuracy": a} for a in [0.5, nan, 0.7] * (LATE_EVALUATIONS // 2)]
    assert late_accuracy(early + late) == pytest.approx(0.6)
    assert late_accuracy([{"accuracy": 0.3}, {"accuracy": nan}]) == 0.3


def test_time_to_target_counts_wall_time_until_the_first_hit():
    rows = [
        {"round": 1, "accuracy": 0.2, "wall_seconds": 1.0, "slowest_client_seconds": 0.25},
        {"round": 2, "accuracy": float("nan"), "wall_seconds": 1.0, "slowest_client_seconds": 0.5},
        {"round": 3, "accuracy": 0.6, "wall_seconds": 2.0, "slowest_client_seconds": 0.25},
        {"round": 4, "accuracy": 0.9, "wall_seconds": 2.0, "slowest_client_seconds": 0.5},
    ]
    assert _to_target(rows, 0.5) == (3, 4.0, 1.0)
    assert _to_target(rows, 0.95) == (None, None, None)
    older = [{k: v for k, v in r.items() if k != "slowest_client_seconds"} for r in rows]
    assert _to_target(older, 0.5) == (3, 4.0, None)


def test_median_time_counts_unreached_seeds_as_infinitely_slow():
    from neulite.compare import _median_or_none

    assert _median_or_none([1.0, 2.0, 3.0]) == 2.0
    assert _median_or_none([1.0, None, 3.0]) == 3.0
    assert _median_or_none([None, None, 1.0]) is None


def test_a_method_no_client_can_run_is_reported_and_the_rest_compared(tmp_path: Path):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--quiet",
        "--methods",
        "exclusivefl,fedavg",
        "--out",
        str(out),
        *TINY,
        "--set",
        "clients.fractions=[0.2, 0.5]",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"fedavg"}
    assert "budget no stage fits" in summary["skipped"]["exclusivefl"]
    assert "Not run: exclusivefl" in (out / "comparison.md").read_text()
