"""What memory a device has for training, and training held to it.

A device's budget is what it can allocate now: the OS's available memory (free GPU memory with
CUDA), or less where a limit is enforced on the process (its cgroup's memory limit, v2 or v1, or
an `RLIMIT_DATA` / `RLIMIT_AS` resource limit), minus what the process already holds. `limited`
enforces a budget on a stretch of training and `run_within` runs training as a device of that
budget would, so a client that needs more than it has fails as it would on a device (an
allocation refused), not silently. `run_limited` starts any command (a Flower SuperNode, say) as
such a device: `neulite limit --memory-mb N -- COMMAND`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import torch

from neulite.errors import NeuliteError
from neulite.memory import HEAP_BLOCK, MIB, map_blocks_alone
from neulite.optim import SGD

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1
S = TypeVar("S")
T = TypeVar("T")
_CGROUPS = Path("/sys/fs/cgroup")


class OutOfMemory(NeuliteError):
    """Training needed more memory than the device's enforced budget."""


@dataclass(frozen=True)
class Limit:
    """One limit enforced on this process: `limit` bytes, of which `in_use` are taken."""

    source: str
    limit: int
    in_use: int

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.in_use)


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise NeuliteError(f"/proc/self/status has no {field} line: memory limits need Linux")
    return int(match.group(1)) * 1024


def data_in_use() -> int:
    """The bytes `RLIMIT_DATA` counts against this process (its private writable memory, VmData)."""
    return _status_bytes("VmData")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) is no limit


def _inactive_file(stat: Path, key: str) -> int:
    try:
        fields = dict(line.split() for line in stat.read_text().splitlines())
    except (OSError, ValueError):
        return 0
    return int(fields.get(key, 0))


def _memberships(membership: str) -> Iterator[tuple[list[str], str]]:
    """(controllers, group path relative to the hierarchy) per line of a /proc/PID/cgroup text;
    cgroup v2's line has no controllers ("0::/path")."""
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        yield [c for c in controllers.split(",") if c], path.lstrip("/")


def cgroup_limits(root: Path = Path("/sys/fs/cgroup"), membership: str | None = None) -> list[Limit]:
    """The memory limits of this process's cgroup and of each cgroup above it (the tightest binds),
    each with its working set in use (usage less inactive page cache, which the kernel reclaims
    before it kills: what container runtimes count).

    `membership` is /proc/self/cgroup's text; v2 lines read "0::/path", v1 "N:memory:/path"."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return []
    limits = []
    for controllers, path in _memberships(membership):
        if not controllers:
            base = root if (root / "cgroup.controllers").is_file() else root / "unified"
            files, source = ("memory.max", "memory.current", "inactive_file"), "cgroup v2 memory.max"
        elif "memory" in controllers:
            base = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            source = "cgroup v1 memory.limit_in_bytes"
        else:
            continue
        group = base / path
        while True:
            limit, in_use = _read_int(group / files[0]), _read_int(group / files[1])
            if limit is not None and limit < _UNLIMITED and in_use is not None:
                in_use -= _inactive_file(group / "memory.stat", files[2])
                limits.append(Limit(f"{source} of {group}", limit, in_use))
            if group == base or base not in group.parents:
                break
            group = group.parent
    return limits


def rlimit_limits() -> list[Limit]:
    """The soft `RLIMIT_DATA` and `RLIMIT_AS` of this process, where set."""
    limits = []
    for name, field in (("RLIMIT_DATA", "VmData"), ("RLIMIT_AS", "VmSize")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY:
            limits.append(Limit(name, soft, _status_bytes(field)))
    return limits


def enforced_limits() -> list[Limit]:
    """Every memory limit the OS enforces on this process."""
    return [*cgroup_limits(), *rlimit_limits()]


def available_memory() -> int:
    """Bytes this device can give to training now: free GPU memory with CUDA; else the OS's
    MemAvailable, or the headroom under the tightest limit enforced on this process if smaller."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min([free, *(limit.headroom for limit in enforced_limits())])


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation refused: Python's, torch's allocator's, or oneDNN's (which then reports that it
    could not create a kernel, and keeps failing in that process ever after)."""
    messages = ("can't allocate memory", "could not create a primitive")
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(m in str(exc) for m in messages))


@contextmanager
def limited(budget: int) -> Iterator[None]:
    """Allocations of more than `budget` bytes beyond what this process holds now are refused
    (`RLIMIT_DATA`, lifted again after), and training that makes one raises `OutOfMemory`.

    Per process: another thread's allocations count too, so use it around one client's work, in a
    process that has trained before or ran `warm_up` (a first step's one-time set-up is not training)."""
    map_blocks_alone("an enforced memory budget")
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_in_use() + budget
    if hard != resource.RLIM_INFINITY and limit > hard:
        limit = hard
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutOfMemory(f"training needed more than its budget of {budget / MIB:.1f} MiB ({first_line})") from None
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def warm_up() -> None:
    """Run the one-time set-up a process's first training step does (oneDNN's kernels and caches),
    so that it counts as the runtime's baseline, not as training."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten())
    optimizer = SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 1, 6, 6)).sum().backward()
    optimizer.step()


# per cgroup version: the memory limit's file, and the swap limit's (set too where the kernel has
# one, so that swap cannot stand in for the RAM a device lacks)
_LIMIT_FILES = {
    "cgroup v2": ("memory.max", "memory.swap.max"),
    "cgroup v1": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
}


def group_home(root: Path = _CGROUPS, membership: str | None = None) -> tuple[str, Path] | None:
    """("cgroup v2" or "cgroup v1", the folder where this process may create a memory group), or
    None where it may not. v1: under its own memory group. v2: beside its own group, since a v2
    group that holds processes cannot also have children with controllers; the parent must pass the
    memory controller down (`cgroup.subtree_control`), as it does wherever the own group has one."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    for controllers, path in _memberships(membership):
        if not controllers:
            base = root if (root / "cgroup.controllers").is_file() else root / "unified"
            home = (base / path).parent if path else base
            try:
                delegated = "memory" in (home / "cgroup.subtree_control").read_text().split()
            except OSError:
                delegated = False
            if delegated and os.access(home, os.W_OK):
                return "cgroup v2", home
        elif "memory" in controllers and os.access(root / "memory" / path, os.W_OK):
            return "cgroup v1", root / "memory" / path
    return None


def enforcement() -> str:
    """How `run_within` and `run_limited` hold a device to its budget here: "cgroup v2" or
    "cgroup v1" where this process may create memory groups (resident memory, as a device's RAM
    counts it), else "RLIMIT_DATA" (virtual memory: stricter, since oneDNN's kernel code and glibc's
    reserves count too)."""
    home = group_home()
    return "RLIMIT_DATA" if home is None else home[0]


def memory_group(name: str, budget: int, home: tuple[str, Path] | None = None) -> Path:
    """A new memory group `name` limited to `budget` bytes (RAM, and no swap where the kernel counts
    it) in `home` (default: `group_home()`); a process joins it by writing its pid to the group's
    cgroup.procs."""
    home = home or group_home()
    if home is None:
        raise NeuliteError("this process may not create memory cgroups (it needs write access to a memory hierarchy)")
    how, folder = home
    group = folder / name
    group.mkdir()
    limit, swap = _LIMIT_FILES[how]
    (group / limit).write_text(str(budget))
    if (group / swap).exists():
        (group / swap).write_text("0" if how == "cgroup v2" else str(budget))
    return group


def remove_group(group: Path) -> None:
    """Kill what is left in `group` (processes a command left behind) and remove it."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        group.rmdir()


def _device_name(pid: int) -> str:
    """The memory group `run_within`'s device process `pid` makes for itself and its parent removes."""
    return f"neulite-device-{pid}"


def _device_group(pid: int) -> Path | None:
    home = group_home()
    return None if home is None else home[1] / _device_name(pid)


@contextmanager
def _held(budget: int, how: str) -> Iterator[None]:
    """This process held to `budget` more bytes than it holds now, as `enforcement()` says."""
    if how == "RLIMIT_DATA":
        with limited(budget):
            yield
        return
    map_blocks_alone("an enforced memory budget")
    group = memory_group(_device_name(os.getpid()), budget)
    (group / "cgroup.procs").write_text(str(os.getpid()))  # from now on, what it touches is charged here
    yield


def _device(budget: int, how: str, setup: Callable[[], S], work: Callable[[S], T], conn: Connection) -> None:
    torch.set_num_threads(1)
    try:
        state = setup()
        warm_up()
        with _held(budget, how):
            outcome: tuple[bool, Any] = (True, work(state))
    except Exception as exc:  # sent to the parent, which raises it
        outcome = (False, exc)
    try:
        payload = pickle.dumps(outcome)
    except Exception:  # an exception that does not pickle goes as its text
        payload = pickle.dumps((False, NeuliteError(f"{type(outcome[1]).__name__}: {outcome[1]}")))
    conn.send_bytes(payload)
    conn.close()


def run_within(budget: int, setup: Callable[[], S], work: Callable[[S], T], how: str | None = None) -> T:
    """`work(setup())` as a device with `budget` bytes for training runs it: in a fresh process on
    one torch thread, where `setup` (loading its data, say) and the runtime's one-time set-up
    (`warm_up`) are the baseline and the OS then holds `work` to `budget` more (`enforcement()`:
    a memory cgroup of its own, which kills it beyond; or `RLIMIT_DATA`, which refuses the
    allocation). glibc maps every block of a page or more on its own there, so what is held is what
    is used. `setup` and `work` must pickle (top-level functions, `functools.partial`); so must
    what they return. Raises `work`'s exception, or `OutOfMemory` when it needed more. `how`
    ("cgroup v2", "cgroup v1" or "RLIMIT_DATA") overrides `enforcement()`."""
    if not isinstance(budget, int) or budget <= 0:
        raise NeuliteError(f"run_within: budget must be a positive number of bytes, got {budget!r}")
    how = how or enforcement()
    if how not in (*_LIMIT_FILES, "RLIMIT_DATA"):
        raise NeuliteError(f'run_within: how must be "cgroup v2", "cgroup v1" or "RLIMIT_DATA", got {how!r}')
    # a fresh process: a fork's copy-on-write copies of this one's pages would be charged to it
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_device, args=(budget, how, setup, work, send), daemon=True)
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(HEAP_BLOCK)  # read by glibc as the child starts
    try:
        child.start()
    finally:
        if before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before
    send.close()
    group = _device_group(child.pid) if how in _LIMIT_FILES else None
    try:
        try:
            ok, value = pickle.loads(receive.recv_bytes())
        except EOFError:
            child.join()
            if group is not None and child.exitcode == -signal.SIGKILL:  # in a group of its own: the OOM killer
                raise OutOfMemory(
                    f"training needed more than its budget of {budget / MIB:.1f} MiB: the kernel killed it ({how} limit)"
                ) from None
            raise OutOfMemory(
                f"the process training within {budget / MIB:.1f} MiB died (exit code {child.exitcode})"
            ) from None
        child.join()
    finally:
        receive.close()
        if group is not None and group.exists():
            remove_group(group)
    if not ok:
        raise value
    return value


def run_limited(command: list[str], budget: int) -> int:
    """Run `command` as a device with `budget` bytes of memory and return its exit status: in a
    memory cgroup of its own with that limit (the command and every process it starts share it,
    as a device's RAM; the kernel kills beyond it), or where this process cannot create one, with
    an `RLIMIT_DATA` of `budget` on each process it starts. A node started so reports its budget from
    that limit (`clients.budget = "measured"`). SIGINT and SIGTERM are passed on; what the command
    leaves running in its group is stopped with it."""
    if not command:
        raise NeuliteError("neulite limit: no command to run (give it after --)")
    if budget <= 0:
        raise NeuliteError(f"neulite limit: the memory limit must be positive, got {budget} bytes")
    how = enforcement()
    group = memory_group(f"neulite-node-{os.getpid()}", budget) if how in _LIMIT_FILES else None

    def join() -> None:  # in the child, before it runs the command
        if group is None:
            resource.setrlimit(resource.RLIMIT_DATA, (budget, resource.getrlimit(resource.RLIMIT_DATA)[1]))
        else:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    print(f"neulite limit: {budget / MIB:.0f} MiB ({how}) for {' '.join(command)}", file=sys.stderr, flush=True)
    try:
        child = subprocess.Popen(command, preexec_fn=join)  # preexec_fn: safe, this process runs no threads
    except OSError as exc:
        if group is not None:
            remove_group(group)
        raise NeuliteError(f"neulite limit: cannot start {command[0]}: {exc.strerror}") from None
    passed = {
        sig: signal.signal(sig, lambda number, _: child.send_signal(number)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    kills = 0
    try:
        status = child.wait()
    finally:
        for sig, handler in passed.items():
            signal.signal(sig, handler)
        if group is not None:
            kills = oom_kills(group)
            remove_group(group)
    if kills:
        print(
            f"neulite limit: the kernel killed {kills} process(es) that needed more than {budget / MIB:.0f} MiB",
            file=sys.stderr,
        )
    return 128 - status if status < 0 else status


def oom_kills(group: Path) -> int:
    """How many of `group`'s processes the kernel killed for exceeding its limit (0 where unknown)."""
    for name in ("memory.events", "memory.oom_control"):  # v2, v1
        try:
            text = (group / name).read_text()
        except OSError:
            continue
        match = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return 0
