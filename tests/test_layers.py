"""The architecture's seams: the layers import only downwards, the wire format knows no method, and
a method is registered in one place."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "neulite"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def _forbidden(paths: list[Path], prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    """Per file, the imports that start with one of `prefixes`."""
    found = {path.name: {m for m in _imports(path) if m.startswith(prefixes)} for path in paths}
    return {name: bad for name, bad in found.items() if bad}


def test_models_and_memory_know_no_algorithm_or_driver():
    paths = [SRC / "memory.py", SRC / "saved_tensors.py", *(SRC / "models").glob("*.py")]
    assert not _forbidden(paths, ("neulite.algorithms", "neulite.simulation", "neulite.flower", "neulite.server"))


def test_algorithms_know_no_driver():
    paths = list((SRC / "algorithms").glob("*.py"))
    assert not _forbidden(paths, ("neulite.simulation", "neulite.flower", "neulite.server", "neulite.experiment"))


def test_the_flower_driver_does_not_import_the_in_process_simulator():
    assert not _forbidden(list((SRC / "flower").glob("*.py")), ("neulite.simulation", "neulite.runner"))


def test_the_wire_format_names_no_algorithm():
    imported = _imports(SRC / "flower" / "wire.py")
    methods = {p.stem for p in (SRC / "algorithms").glob("*.py")} - {"__init__", "base", "payload"}
    assert not {m for m in imported if m.rsplit(".", 1)[-1] in methods}, imported


def test_a_method_registered_once_is_known_to_config_and_builder(monkeypatch):
    from neulite.algorithms import registry
    from neulite.algorithms.fedavg import FedAvg
    from neulite.config import load_config
    from neulite.experiment import build_experiment

    class Mine(FedAvg):
        pass

    monkeypatch.setitem(registry.METHODS, "mine", Mine)
    cfg = load_config(overrides=["method.name=mine", "data.num_clients=4", "clients.per_round=2"])
    assert isinstance(build_experiment(cfg).method, Mine)
