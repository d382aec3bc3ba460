"""Flower's deployment engine on loopback: a real SuperLink (TLS, SuperNode authentication) and 2
SuperNodes, each with its partition and memory budget in its node config, run neulite for 2 rounds
through `flwr run apps/flower`. The budgets the nodes report decide who trains which stage: one
node's from its node config, the other's measured under the memory limit `neulite limit` starts it
with (a device); a third SuperNode, whose key was never registered, is refused. (Each message a node gets starts a Python
process that imports torch: two nodes keep the test within the suite's time.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from neulite.memory import MIB

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # starts a SuperLink and SuperNodes

# small_cnn in 2 blocks at batch 32: stage 2 18.1 MiB, stage 1 20.4 MiB, full 28.7 MiB; None: measured
BUDGETS_MB = (19, None)
LIMIT_MB = 1200  # the measured node's device: its SuperNode, the ClientApp process and training share it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Background processes in their own sessions, stopped with every helper they spawned."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.procs = logs, env, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str) -> dict:
        out = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"], env=self.env, capture_output=True, text=True, timeout=120
        )
        return json.loads(out.stdout)

    def stop(self) -> None:
        helpers = []  # SuperExec processes poll their parent; kill their process groups too
        for proc in self.procs:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    if f"--parent-pid\0{proc.pid}\0" in cmdline.read_text() + "\0":
                        helpers.append(int(cmdline.parent.name))
                except OSError:
                    pass
        for proc in reversed(self.procs):  # all at once: each takes a second or two to wind down
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in helpers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
            end = time.monotonic() + 1
            while time.monotonic() < end and any(Path(f"/proc/{pid}").exists() for pid in helpers):
                time.sleep(0.05)


def _wait(what: str, check, deadline: float, logs: Path) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def test_superlink_and_two_supernodes_on_loopback_train_with_reported_budgets(tmp_path):
    certs, logs, home, out = tmp_path / "certs", tmp_path / "logs", tmp_path / "flwr-home", tmp_path / "out"
    logs.mkdir()
    home.mkdir()
    subprocess.run(
        [str(ROOT / "scripts" / "make-dev-certs.sh"), "-n", "3", str(certs)], check=True, capture_output=True
    )
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    procs = Processes(logs, env)
    try:
        link = procs.start(
            "superlink",
            "flower-superlink",
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.crt"),
            "--ssl-keyfile",
            str(certs / "server.key"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
        tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))

        def healthy() -> bool:
            assert link.poll() is None, "the SuperLink exited"
            try:
                return urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=tls, timeout=2).status == 200
            except OSError:
                return False

        _wait("the SuperLink", healthy, 60, logs)
        for i in range(len(BUDGETS_MB)):
            assert procs.flwr("supernode", "register", str(certs / f"supernode-{i}.pub"), "local")["success"]
        for i, budget in enumerate((*BUDGETS_MB, 1000)):  # the last key is never registered
            supernode = ("flower-supernode",)
            if budget is None:  # a device: the SuperNode under a memory limit
                supernode = ("neulite", "limit", "--memory-mb", str(LIMIT_MB), "--", str(BIN / supernode[0]))
            procs.start(
                f"supernode-{i}",
                *supernode,
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(certs / f"supernode-{i}.key"),
                "--port",
                str(_free_port()),
                "--max-wait-time",
                "120",
                "--node-config",
                f"partition-id={i} num-partitions={len(BUDGETS_MB)}" + (f" budget-mb={budget}" if budget else ""),
            )
        run_config = f'method.rounds=2 model.blocks=2 data.num_clients={len(BUDGETS_MB)} clients.per_round={len(BUDGETS_MB)} data.train_size=2000 train.local_epochs=1 out="{out}" round-timeout=300.0'
        started = procs.flwr("run", str(ROOT / "apps" / "flower"), "local", "--run-config", run_config)
        assert started["success"], started
        status, asked = {}, [time.monotonic()]

        def finished() -> bool:
            # each `flwr ls` is a new Python process: ask every 60 s until the summary appears, then every 3 s
            if time.monotonic() - asked[0] < (3 if (out / "summary.json").is_file() else 60):
                return False
            asked[0] = time.monotonic()
            status.update(procs.flwr("ls", "local", "--run-id", started["run-id"])["runs"][0])
            return status["status"].startswith("finished")

        _wait("the run to finish", finished, 400, logs)
        assert status["status"] == "finished:completed", status
    finally:
        procs.stop()
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the SuperLink activated the registered nodes only: the unregistered one never joined
    assert (logs / "superlink.log").read_text().count("[Fleet.ActivateNode] Activated") == 2
    # the measured node's budget is its limit less what the node holds (its SuperNode, a ClientApp
    # process with torch and its shard): above full-model training's peak, well below the limit
    budgets = summary["node_budgets"]
    assert budgets["0"] == {"budget_bytes": 19 * MIB, "source": "node-config"}
    assert budgets["1"]["source"] == "measured", budgets
    assert 100 * MIB < budgets["1"]["budget_bytes"] < (LIMIT_MB - 250) * MIB, budgets
    # stage 1 fits only the measured node, stage 2 both
    assert [(r["stage"], r["eligible"], r["participants"]) for r in rows] == [(1, 1, 1), (2, 2, 2)]
    assert summary["driver"] == "flower" and summary["nodes"] == 2 and summary["participation"] == 1.0
    assert summary["final_accuracy"] > 0.1
