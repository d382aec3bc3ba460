"""The Flower app folder and the node side of profiling: what `flwr run apps/flower` loads, and
how a node finds its partition and budget."""

import functools
from pathlib import Path

import pytest
import tomllib

from neulite.config import Config, load_config
from neulite.device_memory import enforced_limits, enforcement, run_within
from neulite.errors import NeuliteError
from neulite.federation import simulated_budgets
from neulite.memory import MIB

pytest.importorskip("flwr")
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from neulite.flower import client_app, server_app  # noqa: E402
from neulite.flower.run_config import parse_run_config  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "flower" / "pyproject.toml"


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_app_components_and_config_are_neulites_defaults_with_measured_budgets():
    app = tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "neulite.flower.server_app:app",
        "clientapp": "neulite.flower.client_app:app",
    }
    assert isinstance(server_app.app, ServerApp) and isinstance(client_app.app, ClientApp)
    cfg, driver = parse_run_config(_flat(app["config"]))
    assert cfg == Config().replace(clients=Config().clients.__class__(budget="measured"))
    assert driver.out == "results/flower" and not driver.resume


def _context(node_config: dict, **overrides) -> Context:
    run_config = {"data.num_clients": 4, "clients.per_round": 2, **overrides}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def _nothing() -> None:
    return None


def _measured_budget(cfg: Config, _: None) -> tuple[int, list[str]]:
    """What node 3 reports under the limit it runs in, and which limits it saw."""
    return client_app.node_budget(_context({"partition-id": 3}), cfg, 3, 10 * MIB)[0], [
        lim.source for lim in enforced_limits()
    ]


def test_a_node_reports_its_configured_budget_else_the_budget_model_or_its_free_memory():
    cfg = load_config(overrides=["data.num_clients=4", "clients.per_round=2"])
    assert client_app.node_budget(_context({"partition-id": 2, "budget-mb": 18}), cfg, 2, 10 * MIB) == (
        18 * MIB,
        "node-config",
    )
    assert client_app.node_budget(_context({"partition-id": 2}), cfg, 2, 10 * MIB) == (
        simulated_budgets(cfg, 10 * MIB)[2],
        "fraction",
    )
    measured = cfg.replace(clients=cfg.clients.__class__(per_round=2, budget="measured"))
    budget, source = client_app.node_budget(_context({"partition-id": 2}), measured, 2, 10 * MIB)
    assert source == "measured" and budget > 64 * MIB  # this machine's available memory
    under_limit, sources = run_within(256 * MIB, _nothing, functools.partial(_measured_budget, measured))
    assert any(enforcement() in source for source in sources)
    assert 200 * MIB < under_limit <= 256 * MIB  # the limit less the shard and runtime it loaded under it
    with pytest.raises(NeuliteError, match="budget-mb must be a positive number"):
        client_app.node_budget(_context({"partition-id": 2, "budget-mb": -1}), cfg, 2, 10 * MIB)
    with pytest.raises(NeuliteError, match=r"partition-id must be an integer in \[0, 4\)"):
        client_app.partition_id(_context({"partition-id": 4}), cfg)
