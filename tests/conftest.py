import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test worker: two workers with two OpenMP threads each on two cores spin-wait
    # against each other and run several times slower than one thread each
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and for the processes a test starts (Ray, SuperNodes, spawned probes)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker more than cores: the engine tests spend much of their time waiting on processes
    they start, and the extra worker fills that time (each worker runs torch on one thread)."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the long engine tests (a SuperLink, Ray) first, one per worker, so the other workers
    share the rest while those wait on their processes."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
