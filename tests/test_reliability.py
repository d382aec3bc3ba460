"""Failure and trust: hostile or broken clients never reach the global model, a results folder is
never lost to a bad command, and every bad input is a one-line error. One test per threat."""

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.merge import merge
from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.cli import main
from neulite.compare import compare
from neulite.config import ServerConfig, load_config
from neulite.errors import NeuliteError
from neulite.memory import PROBE_BATCH, _account, estimate, step_flops
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
from neulite.results import ResultsDir
from neulite.simulation import Simulation, run_experiment

pytestmark = pytest.mark.xdist_group("reliability")  # one worker builds the shared federation and run

SMALL = [
    "data.num_clients=5",
    "clients.per_round=5",
    "method.rounds=3",
    "train.local_epochs=1",
    "data.name=digits",
    "data.train_size=500",  # what a round does with replies is tested, not learning
    "clients.fractions=[1.2, 1.3]",
    "eval.every=3",
]


@pytest.fixture(scope="module")
def federation() -> Simulation:
    """The small federation before round 1; tests train copies of it."""
    return Simulation(load_config(overrides=SMALL))


def hostile(sim: Simulation, who: list[int], attack) -> Simulation:
    """A copy of `sim` in which the clients in `who` answer with `attack(task, honest reply)`."""
    sim = copy.deepcopy(sim)
    honest = sim.train

    def train(cid: int, task: ClientTask) -> ClientResult:
        return attack(task, honest(cid, task)) if cid in who else honest(cid, task)

    sim.train = train
    return sim


def _corrupt_first(value):
    return lambda task, r: ClientResult(
        {**r.arrays, next(iter(r.arrays)): value(r.arrays[next(iter(r.arrays))])}, r.num_examples, r.metrics
    )


def _raise(task, r):
    raise RuntimeError("the device ran out of battery")


ATTACKS = {
    "nan": _corrupt_first(lambda t: torch.full_like(t, float("nan"))),
    "huge": _corrupt_first(lambda t: torch.full_like(t, 1e30)),
    "wrong-shape": _corrupt_first(lambda t: torch.zeros(3)),
    "wrong-dtype": _corrupt_first(lambda t: t.double()),
    "missing": lambda task, r: ClientResult(dict(list(r.arrays.items())[1:]), r.num_examples, r.metrics),
    "extra": lambda task, r: ClientResult({**r.arrays, "spy": torch.zeros(1)}, r.num_examples, r.metrics),
    "zero-examples": lambda task, r: ClientResult(r.arrays, 0, r.metrics),
    "negative-examples": lambda task, r: ClientResult(r.arrays, -5, r.metrics),
    "inflated-examples": lambda task, r: ClientResult(r.arrays, 10**12, r.metrics),
    "not-a-result": lambda task, r: {"arrays": r.arrays},
    "exception": _raise,
}


@pytest.fixture(scope="module")
def honest_round(federation):
    """The global model after round 1 of the small federation with every client honest."""
    sim = copy.deepcopy(federation)
    sim.run_round(1)
    return sim.method.net.state_dict()


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_bad_reply_is_left_out_and_logged_and_the_round_goes_on(attack, federation, honest_round, caplog):
    sim = hostile(federation, [2], ATTACKS[attack])
    with caplog.at_level(logging.WARNING):
        record = sim.run_round(1)
    assert record.participants == 4
    assert any("client 2 left out" in m for m in caplog.messages), caplog.messages
    state = sim.method.net.state_dict()
    assert all(t.isfinite().all() for t in state.values() if t.is_floating_point())
    weights = [k for k in state if state[k].is_floating_point()]  # batch counters differ by the fifth client's batches
    drift = max(float((state[k] - honest_round[k]).abs().max()) for k in weights)
    assert drift < 1.0  # four honest clients instead of five: nowhere near the attacker's values


def test_an_update_far_beyond_the_others_is_left_out_even_when_finite(federation, caplog):
    scaled = lambda task, r: ClientResult(  # noqa: E731
        {k: task.arrays[k] + 10**4 * (v - task.arrays[k]) if v.is_floating_point() else v for k, v in r.arrays.items()},
        r.num_examples,
        r.metrics,
    )
    sim = hostile(federation, [0], scaled)
    with caplog.at_level(logging.WARNING):
        assert sim.run_round(1).participants == 4
    assert any("client 0 left out: its update" in m and "server.outlier_ratio" in m for m in caplog.messages)


def test_robust_rules_hold_one_attacker_among_several_near_the_honest_mean():
    honest = [torch.full((5,), v, dtype=torch.float64) for v in (1.0, 1.2, 0.8, 1.1)]
    attacker = torch.full((5,), -1e6, dtype=torch.float64)
    mean = ServerConfig()
    for rule in ("median", "trimmed_mean"):
        merged = merge([*honest, attacker], [1, 1, 1, 1, 10**9], dataclasses.replace(mean, aggregation=rule))
        assert (merged - 1.025).abs().max() < 0.2, rule
    assert merge([*honest, attacker], [1] * 5, mean).max() < -1e5  # the plain mean is dragged away


def test_robust_rules_merge_each_element_over_its_holders_only():
    nan = float("nan")
    placed = [torch.tensor([1.0, nan, 5.0]), torch.tensor([3.0, nan, nan]), torch.tensor([2.0, nan, 100.0])]
    placed = [p.double() for p in placed]
    median = merge(placed, [1, 1, 1], ServerConfig(aggregation="median"))
    assert median[0] == 2.0 and math.isnan(median[1]) and median[2] == 52.5  # two holders: their midpoint
    trimmed = merge(placed, [1, 1, 1], ServerConfig(aggregation="trimmed_mean", trim=0.34))
    assert trimmed[0] == 2.0 and trimmed[2] == 52.5  # one cut from each end of three; none of two


def test_a_sign_flipping_attacker_moves_a_robust_round_far_less_than_the_mean():
    flip = lambda task, r: ClientResult(  # noqa: E731
        {k: task.arrays[k] - 3 * (v - task.arrays[k]) if v.is_floating_point() else v for k, v in r.arrays.items()},
        r.num_examples,
        r.metrics,
    )

    def moved(rule: str) -> float:
        cfg = load_config(overrides=[*SMALL, f"server.aggregation={rule}"])
        clean = Simulation(cfg)
        attacked = hostile(clean, [1], flip)
        clean.run_round(1)
        attacked.run_round(1)
        a, b = clean.method.net.state_dict(), attacked.method.net.state_dict()
        return math.sqrt(sum(float((b[k] - a[k]).square().sum()) for k in a if a[k].is_floating_point()))

    dragged = moved("mean")
    for rule in ("median", "trimmed_mean"):
        assert moved(rule) < dragged / 2, rule


def test_a_client_without_a_trainable_batch_is_refused(federation):
    sim = copy.deepcopy(federation)
    configured = sim.server.configure(1)
    cid, task = next(iter(configured.tasks.items()))
    one = sim.clients[cid].train
    tiny = type(one)(one.x[:1], one.y[:1], one.num_classes)
    with pytest.raises(NeuliteError, match="1 training sample"):
        sim.method.client_update(task, tiny, augment=False)


def test_divergent_training_never_puts_a_non_finite_tensor_in_the_checkpoint(tmp_path):
    cfg = load_config(overrides=[*SMALL, "train.lr=1000"])
    try:
        run_experiment(cfg, tmp_path)
    except NeuliteError as exc:
        assert "usable result" in str(exc)
    checkpoint = tmp_path / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)["simulation"]["net"]
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point())


def test_the_estimate_probes_a_capped_batch_and_extrapolates_linearly():
    net = StageNet(build_model("small_cnn", (1, 28, 28), 10, 1.0, 0))
    plan = net.full_plan()
    big = 2 * PROBE_BATCH
    (exact, exact_flops), extrapolated = (
        _account(net, plan, big, cross_entropy_loss),
        estimate(net, plan, big, cross_entropy_loss),
    )
    assert abs(extrapolated.total - exact.total) / exact.total < 0.05
    assert step_flops(net, plan, big, cross_entropy_loss) == exact_flops  # every sample costs the same


def test_a_huge_batch_is_refused_before_any_tensor_of_its_size_exists(tmp_path):
    cfg = load_config(overrides=[*SMALL, "train.batch_size=100000"])
    with pytest.raises(
        NeuliteError, match="train.batch_size = 100000 exceeds the 100 training samples each of the 5 clients"
    ):
        run_experiment(cfg, tmp_path)
    assert not any(tmp_path.iterdir())
    crowd = load_config(overrides=[*SMALL, "data.num_clients=100000"])  # more clients than samples
    with pytest.raises(NeuliteError, match=r"each of the 100000 clients .* or data.num_clients \(at most 15 at this"):
        run_experiment(crowd, tmp_path)


# --- results folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished small run's folder (never modified by the tests: they copy it first)."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", "--quiet", "--out", str(out), *[f"--set={o}" for o in SMALL]]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name, data in _snapshot(src).items():
        (dst / name).write_bytes(data)
    return dst


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_a_finished_run_is_not_overwritten_without_overwrite(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    rc, err = _cli(capsys, "run", "--quiet", "--out", str(out), *[f"--set={o}" for o in SMALL])
    assert rc == 2 and "already holds a run" in err and "--overwrite" in err
    assert _snapshot(out) == before


def test_a_bad_run_pointed_at_a_finished_folder_with_overwrite_leaves_it_intact(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    for bad in ("clients.fractions=[0.01, 0.02]", "data.name=cifar10", "train.batch_size=100000"):
        rc, err = _cli(
            capsys, "run", "--quiet", "--overwrite", "--out", str(out), *[f"--set={o}" for o in SMALL], f"--set={bad}"
        )
        assert rc == 2 and err.startswith("neulite: error:") and err.count("\n") == 1, (bad, err)
        assert _snapshot(out) == before, bad


def test_overwrite_replaces_the_run_and_leaves_no_checkpoint_of_the_old_one(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    run_experiment(load_config(overrides=[*SMALL, "method.name=fedavg", "method.rounds=1"]), out, overwrite=True)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1


@pytest.mark.parametrize(
    ("change", "key"),
    [(["--set", "train.lr=0.2"], "train.lr"), (["--set", "method.rounds=5"], "method.rounds")],
)
def test_resume_refuses_a_changed_config_naming_the_keys(finished, tmp_path, capsys, change, key):
    out = _copy(finished, tmp_path / "run")
    rc, err = _cli(capsys, "run", "--quiet", "--resume", "--out", str(out), *change)
    assert rc == 2 and "differs from the checkpoint's in" in err and key in err


def test_resume_refuses_an_edited_config_file(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    config = out / "config.toml"
    config.write_text(config.read_text().replace("num_clients = 5", "num_clients = 6"))
    rc, err = _cli(capsys, "run", "--quiet", "--resume", "--out", str(out))
    assert rc == 2 and "data.num_clients" in err
    assert _snapshot(out) == {**before, "config.toml": config.read_bytes()}


def test_a_checkpoint_of_the_wrong_structure_is_a_one_line_error(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["simulation"]["net"] = {"nonsense": torch.zeros(1)}
    torch.save(state, out / "checkpoint.pt")
    rc, err = _cli(capsys, "run", "--quiet", "--resume", "--out", str(out))
    assert rc == 2 and "corrupted checkpoint" in err and err.count("\n") == 1


def test_a_folder_another_process_is_writing_is_refused_untouched_and_released_after(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    with ResultsDir(out).hold():  # as a run or comparison writing there holds it
        rc, err = _cli(capsys, "run", "--quiet", "--resume", "--out", str(out))
        assert rc == 2 and "is in use" in err and err.count("\n") == 1
        with pytest.raises(NeuliteError, match="is in use"):
            compare(load_config(overrides=SMALL), ["fedavg"], [0], out)
    assert _snapshot(out) == before
    rc, err = _cli(capsys, "run", "--quiet", "--resume", "--out", str(out), "--set", "train.lr=0.2")
    assert rc == 2 and "differs" in err  # a refused run lets the folder go too
    with ResultsDir(out).hold():
        pass


def test_a_full_disk_stops_the_run_by_name_and_resume_carries_on_from_the_last_whole_checkpoint(
    tmp_path, monkeypatch, capsys
):
    out, saves, real_save = tmp_path / "run", [], torch.save

    def second_save_on_a_full_disk(obj, f):
        saves.append(1)
        if len(saves) < 2:
            return real_save(obj, f)
        with open("/dev/full", "wb") as full:  # writes fail as on a full disk: ENOSPC
            real_save(obj, full)

    monkeypatch.setattr("neulite.results.torch.save", second_save_on_a_full_disk)
    small = [*SMALL, "method.name=fedavg", "method.rounds=2"]
    rc, err = _cli(capsys, "run", "--quiet", "--out", str(out), *[f"--set={o}" for o in small])
    assert rc == 2 and "No space left on device" in err and "--resume" in err and err.count("\n") == 1, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1
    assert not (out / "checkpoint.tmp").exists()
    monkeypatch.setattr("neulite.results.torch.save", real_save)
    assert main(["run", "--quiet", "--resume", "--out", str(out)]) == 0
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_metrics_row_cut_short_by_a_crash_does_not_block_resume(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    rows = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(rows + '{"round": 4, "accur')  # a write a crash cut short
    assert main(["run", "--quiet", "--resume", "--out", str(out)]) == 0
    assert (out / "metrics.jsonl").read_text() == rows


# --- one-line errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--set", "seed=-1"], "seed must be an integer in"),
        (["run", "--set", f"seed={2**70}"], "seed must be an integer in"),
        (["run", "--set", "clients.budget=tiers", "--set", "clients.tier_weights=[inf, 1.0, 1.0]"], "finite"),
        (["run", "--set", "train.lr=nan"], "finite"),
        (["compare", "--seeds", "-1"], "--seeds must be integers"),
        (["compare", "--methods", ""], "--methods names no method"),
        (["memory", "--batch-size", "-5"], "--batch-size must be >= 1"),
        (["memory", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, argv, message):
    rc, err = _cli(capsys, *argv)
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_a_non_utf8_config_and_an_out_that_is_a_file_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_bytes(b"seed = 0\n# \xff\xfe\n")
    rc, err = _cli(capsys, "run", "--config", str(config))
    assert rc == 2 and "not UTF-8" in err and err.count("\n") == 1
    rc, err = _cli(capsys, "run", "--out", str(config), *[f"--set={o}" for o in SMALL])
    assert rc == 2 and "is a file" in err and err.count("\n") == 1


KEYS = [
    "seed",
    "data.num_clients",
    "data.alpha",
    "data.partition",
    "data.val_fraction",
    "train.batch_size",
    "train.lr",
    "train.local_epochs",
    "method.name",
    "method.rounds",
    "method.neulite.lambda1",
    "clients.per_round",
    "clients.fractions",
    "clients.budget",
    "server.aggregation",
    "server.trim",
    "model.name",
    "model.width",
    "eval.every",
    "nonsense.key",
    "data",
]
VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "[]", "[1, 2, 3]", '"x"', "true", "{a = 1}", "inf", "-0", "1e400", "\u00e9", "[0.3, inf]"]),
    st.text(max_size=8),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_fuzzed_overrides_never_traceback_and_never_touch_a_finished_run(finished, capsys, overrides):
    before = _snapshot(finished)
    rc, err = _cli(capsys, "run", "--quiet", "--out", str(finished), *[f"--set={k}={v}" for k, v in overrides])
    assert rc != 0
    assert err.startswith("neulite: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert _snapshot(finished) == before
