"""The in-process simulator's clients trained side by side, in worker processes.

Each worker serves clients as a Flower node does (`load_node`: its shard and a meta-device
skeleton, built from the config alone) and runs the same `Method.client_update` on the task it is
sent, on one torch thread. A reply depends only on the task (its tensors and seed) and the
client's data, so a round's replies are bit for bit those of a sequential run on one thread,
whatever the number of workers; wall time approaches what a federation waits for.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from neulite.algorithms.payload import ClientResult, ClientTask
from neulite.config import Config
from neulite.errors import NeuliteError
from neulite.federation import load_node, train_on_device
from neulite.prefix_cache import PrefixStore

_CONFIG: Config | None = None  # the experiment a worker serves, set once when it starts
_PREFIXES: PrefixStore | None = None  # the frozen-prefix caches of the clients it has served


def _start_worker(cfg: Config) -> None:
    global _CONFIG, _PREFIXES
    _CONFIG, _PREFIXES = cfg, PrefixStore(cfg.train.prefix_cache_mb)
    torch.set_num_threads(1)


def _train(job: tuple[int, ClientTask, int]) -> tuple[int, ClientResult | None, str]:
    cid, task, budget = job
    assert _CONFIG is not None and _PREFIXES is not None
    try:
        if _CONFIG.clients.enforce_budgets:
            return cid, train_on_device(_CONFIG, cid, task, budget), ""
        node = load_node(_CONFIG, cid)
        return cid, node.method.client_update(task, node.train, augment=node.augment, cache=_PREFIXES.get(cid)), ""
    except Exception as exc:  # the client's failure is its own: the driver leaves it out
        return cid, None, f"{type(exc).__name__}: {exc}"


class ClientPool:
    """`workers` spawned processes that live for a run (each loads the data once); a worker that
    dies (killed for memory, say) fails only the clients it was serving, and the pool restarts."""

    def __init__(self, cfg: Config, workers: int) -> None:
        if not isinstance(workers, int) or workers < 2:
            raise NeuliteError(f"a client pool needs at least 2 workers, got {workers!r}")
        self._cfg, self._workers = cfg, workers
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self._workers, mp_context=context, initializer=_start_worker, initargs=(self._cfg,))

    def train(
        self, tasks: Mapping[int, tuple[ClientTask, int]], on_done: Callable[[int, ClientResult | None, str], None]
    ) -> None:
        """Every client's update to its (task, budget in bytes); `on_done(cid, result, error)` as each
        finishes (error "" on success)."""
        futures = {self._executor.submit(_train, (cid, task, budget)): cid for cid, (task, budget) in tasks.items()}
        broken = False
        for future in as_completed(futures):
            try:
                on_done(*future.result())
            except BrokenProcessPool as exc:
                broken = True
                on_done(futures[future], None, f"its worker process died: {exc}")
        if broken:
            self._executor.shutdown(cancel_futures=True)
            self._executor = self._start()

    def close(self) -> None:
        self._executor.shutdown(cancel_futures=True)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
