"""The Flower driver: neulite's core on Flower's simulation and deployment engines.

`strategy.NeuliteStrategy` drives the core `Server` (stage schedule, eligibility, sampling,
aggregation); `client_app.app` runs the core client update; `server_app.app` ties them to a results
folder. `wire` is the message format between them. Needs the `flower` extra.
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    from neulite.errors import NeuliteError

    raise NeuliteError('the Flower driver needs Flower: pip install torch==2.13.0 -e ".[flower]"') from exc
