import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test worker: two workers with two OpenMP threads each on two cores spin-wait
    # against each other and run several times slower than one thread each
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and for the processes a test starts (Ray, SuperNodes, spawned probes)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker per core (each runs torch on one thread). The engine tests' own processes keep the
    cores busy while they wait; on 2 cores a third worker made the suite 60 CPU-seconds dearer
    (627 against 564) and 30 s slower."""
    return os.cpu_count() or 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the long engine tests (a SuperLink, Ray) first, one per worker, so the other workers
    share the rest while those wait on their processes."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
