"""Scale: NeuLite federations of 100, 1,000 and 10,000 clients, 10 trained a round, through the
in-process simulator and Flower's simulation engine (one supernode per client).

Every client holds the same number of samples whatever the federation's size (`SAMPLES_PER_CLIENT`
of Fashion-MNIST's training set, IID; the 10,000-client federation takes all 60,000), so a round
trains the same amount and whatever grows with N is the framework's. Each size runs in a fresh
process; a round's seconds are the median over the rounds after the first (which sets up torch's
kernels), from the run's own metrics.jsonl; every figure is the median of `--repeats` runs. Memory
is the peak resident memory of the run's processes summed (sampled every 0.5 s, or the kernel's
exact ru_maxrss of the run's own process if that is more) and the peak summed PSS, which counts a
page shared by Ray's processes once.

Writes benchmarks/results/scale.json. Needs `apt-get install dataset-fashion-mnist` and, for
Flower, the flower extra.  Run: python benchmarks/scale.py [--clients 100,1000,10000] [--flower 100,1000,10000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

from neulite.config import Config, load_config
from neulite.federation import load_splits
from neulite.results import machine

HERE = Path(__file__).parent
OUT = HERE / "results" / "scale.json"
SAMPLES_PER_CLIENT = 6
ROUNDS = 12
REPEATS = 3
SETTING = [
    "method.name=neulite",
    "data.name=fashion-mnist",
    "data.partition=iid",
    "data.val_fraction=0.1",
    "train.batch_size=4",
    "train.local_epochs=1",
    "clients.per_round=10",
    f"method.rounds={ROUNDS}",
    f"eval.every={ROUNDS}",  # the test set once, at the end: a round's time is the federation's, not the evaluation's
    "method.neulite.stage_rounds=[4, 4, 4]",  # every stage is trained
]


def scale_config(clients: int) -> Config:
    return load_config(
        None, [*SETTING, f"data.num_clients={clients}", f"data.train_size={SAMPLES_PER_CLIENT * clients}"]
    )


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except OSError:
            children = []
        pids += [int(c) for c in children]
        i += 1
    return pids


def _memory(pids: list[int]) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of the processes still alive."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class PeakMemory:
    """The peak summed RSS and PSS of a process tree, sampled in a thread while the block runs."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every = pid, every
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, pss = _memory(_tree(self.pid))
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run(engine: str, clients: int) -> dict:
    """One federation in this (fresh) process: its figures."""
    from neulite.flower.simulation import simulate
    from neulite.simulation import run_experiment

    cfg = scale_config(clients)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(os.getpid()) as peak:
        start = time.perf_counter()
        if engine == "inprocess":
            run_experiment(cfg, Path(tmp) / "run")
        else:
            simulate(cfg, Path(tmp) / "run")
        total = time.perf_counter() - start
        rounds = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        "max_rss_bytes": max(peak.rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "max_pss_bytes": peak.pss,
        "seconds_per_round": statistics.median(r["wall_seconds"] for r in rounds[1:-1]),
        "first_round_seconds": rounds[0]["wall_seconds"],
        "total_seconds": total,
        "rounds": len(rounds),
        "samples_per_client": SAMPLES_PER_CLIENT,
        "participants_per_round": statistics.median(r["participants"] for r in rounds),
    }


def measure(engine: str, clients: int, repeats: int) -> dict:
    """The median of `repeats` runs of `_run`, each in a fresh process, so that its memory is this
    federation's alone."""
    runs = []
    for _ in range(repeats):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            runs.append(pool.apply(_run, (engine, clients)))
    return {**{key: statistics.median(run[key] for run in runs) for key in runs[0]}, "runs": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000,10000", help="in-process federation sizes")
    parser.add_argument("--flower", default="100,1000,10000", help="Flower simulation sizes ('' for none)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    info = machine()
    report = json.loads(OUT.read_text()) if OUT.is_file() else {}
    report["machine"] = f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}"
    report["setting"] = SETTING + [f"data.train_size={SAMPLES_PER_CLIENT} x data.num_clients"]
    sample = load_splits(scale_config(100)).train
    sample_bytes = sample.x[0].nbytes + sample.y[0].nbytes
    for engine, sizes in (("inprocess", args.clients), ("flower", args.flower)):
        for n in (int(s) for s in sizes.split(",") if s):
            print(f"{engine}: {n} clients ...", flush=True)
            row = measure(engine, n, args.repeats)
            report.setdefault(engine, {})[str(n)] = row = {
                "training_set_bytes": SAMPLES_PER_CLIENT * n * sample_bytes,
                **row,
            }
            print(
                f"  {row['seconds_per_round']:.2f} s/round, peak RSS {row['max_rss_bytes'] / 2**20:.0f} MiB "
                f"(PSS {row['max_pss_bytes'] / 2**20:.0f} MiB)",
                flush=True,
            )
            OUT.write_text(json.dumps(report, indent=2) + "\n")  # after every size: a long run keeps what it did


if __name__ == "__main__":
    main()
