import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from neulite.cli import main
from neulite.config import config_to_toml, load_config
from neulite.errors import NeuliteError
from neulite.results import ResultsDir
from neulite.simulation import Simulation

TINY = [
    "data.name=digits",
    "data.train_size=600",
    "data.partition=iid",
    "data.num_clients=6",
    "clients.per_round=3",
    "train.local_epochs=1",
    "method.rounds=4",
]


def _run(out: Path, overrides: list[str], *extra: str) -> int:
    args = ["run", "--quiet", "--out", str(out), *extra]
    for o in overrides:
        args += ["--set", o]
    return main(args)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished TINY run, shared read-only: copy it before changing it."""
    out = tmp_path_factory.mktemp("tiny") / "a"
    assert _run(out, TINY) == 0
    return out


@pytest.mark.xdist_group("tiny-run")  # with the other tests of the shared run, which one worker builds
def test_resume_after_a_crash_gives_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_run: Path):
    original = Simulation.run_round

    def crash_in_round_3(self, rnd, on_client=None):
        if rnd == 3:
            raise KeyboardInterrupt
        return original(self, rnd, on_client)

    monkeypatch.setattr(Simulation, "run_round", crash_in_round_3)
    assert _run(tmp_path / "b", TINY) == 130
    metrics = tmp_path / "b" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:  # written by a version that did not record this field yet
        del row["recomputing"]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(Simulation, "run_round", original)
    assert main(["run", "--quiet", "--resume", "--out", str(tmp_path / "b")]) == 0
    with (tmp_path / "b" / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [row["recomputing"] for row in table] == ["", "", "0", "0"]  # not recorded, then recorded
    a, b = (
        torch.load(tiny_run / "model.pt", weights_only=True),
        torch.load(tmp_path / "b" / "model.pt", weights_only=True),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.xdist_group("tiny-run")
def test_corrupted_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_run: Path):
    out = shutil.copytree(tiny_run, tmp_path / "c")
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", "--quiet", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupted or unsafe checkpoint" in err and "refused it: " in err and len(err.splitlines()) == 1


@pytest.mark.xdist_group("tiny-run")
def test_corrupted_metrics_or_summary_is_a_clear_error_naming_the_file(tmp_path: Path, tiny_run: Path):
    run = ResultsDir(shutil.copytree(tiny_run, tmp_path / "c"))
    assert len(run.read_metrics()) == 4 and "final_accuracy" in run.read_summary()
    with run.metrics_path.open("a") as f:
        f.write('{"round": 5, "accura\n')  # a whole line, garbled (a row cut short at a crash has no newline: dropped)
    with pytest.raises(NeuliteError, match=r"corrupted results file .*metrics.jsonl, line 5: Unterminated string"):
        run.read_metrics()
    run.summary_path.write_text("{")
    with pytest.raises(NeuliteError, match=r"corrupted results file .*summary.json: "):
        run.read_summary()


class _Payload:
    """Unpickling this runs a command: what a crafted checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path: Path, monkeypatch, capsys, recwarn):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "c"
    out.mkdir()
    (out / "config.toml").write_text(config_to_toml(load_config(overrides=TINY)))
    torch.save({"round": 1, "simulation": _Payload()}, out / "checkpoint.pt")
    assert main(["run", "--quiet", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unsafe checkpoint" in err and len(err.splitlines()) == 1
    assert "refused it: Trying to load unsupported GLOBAL posix.system" in err
    assert "weights_only` set to `False" not in err  # torch's advice would run the payload
    assert not (tmp_path / "PWNED").exists()
    with (out / "checkpoint.pt").open("wb") as f:  # a plain pickle: torch warned of its protocol before refusing it
        pickle.dump({"round": 1, "simulation": _Payload()}, f, protocol=4)
    assert main(["run", "--quiet", "--resume", "--out", str(out)]) == 2
    assert "unsafe checkpoint" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "--set", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["run", "--config", "/nonexistent.toml"], "config file not found"),
        (["run", "--set", "data.name=cifar10", "--set", "data.root=/nonexistent"], "cifar10"),
        (["run", "--set", "model.name=resnet50"], "resnet50"),
        (["memory", "--model", "small_cnn", "--input-shape", "1,28"], "model 'small_cnn' takes (C, H, W) images"),
        (["memory", "--model", "small_cnn", "--input-shape", "1,2,3,4"], "C,H,W, C,L or F"),
        (["memory", "--model", "small_cnn", "--device", "tpu0"], "unknown device 'tpu0'"),
        (["memory", "--model", "small_cnn", "--device", "meta"], "'cpu' or 'cuda' only"),
        pytest.param(
            ["memory", "--model", "small_cnn", "--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU"),
        ),
    ],
)
def test_bad_input_exits_with_a_one_line_error(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neulite: error:") and fragment in err and "\n" not in err


def test_memory_json_report(capsys: pytest.CaptureFixture[str]):
    """The JSON contract; how close estimate and measurement are is test_memory's (each measurement is a process)."""
    argv = ["memory", "--model", "small_cnn", "--input-shape", "1,28,28", "--batch-size", "16", "--json"]
    assert main([*argv, "--no-measure"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "small_cnn" and report["batch_size"] == 16
    assert report["full"]["estimated_bytes"] > 0 and report["full"]["measured_bytes"] is None
    assert [s["stage"] for s in report["stages"]] == [1, 2, 3]
    assert all(0 < s["estimated_bytes"] < report["full"]["estimated_bytes"] for s in report["stages"])
