"""What memory a device has for training, and training held to it.

A device's budget is what it can allocate now: the OS's available memory (free GPU memory with
CUDA), or less where a limit is enforced on the process (its cgroup's memory limit, v2 or v1, or
an `RLIMIT_DATA` / `RLIMIT_AS` resource limit), minus what the process already holds. `limited`
enforces a budget on a stretch of training and `run_within` runs training as a device of that
budget would, so a client that needs more than it has fails as it would on a device (an
allocation refused), not silently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import re
import resource
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import torch

from neulite.errors import NeuliteError
from neulite.memory import MIB

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1
S = TypeVar("S")
T = TypeVar("T")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


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


def _account_allocations() -> None:
    """Make glibc map every allocation of 64 KiB or more on its own and unmap it when freed, and
    hand back the free top of its heap: what the process holds is then what it uses, so a limit on
    it is a limit on training's memory (at some cost in speed)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise NeuliteError("enforced memory budgets need Linux with glibc (mallopt), which this machine lacks")
    libc.malloc_trim(0)


@contextmanager
def limited(budget: int) -> Iterator[None]:
    """Allocations of more than `budget` bytes beyond what this process holds now are refused
    (`RLIMIT_DATA`, lifted again after), and training that makes one raises `OutOfMemory`.

    Per process: another thread's allocations count too, so use it around one client's work, in a
    process that has trained before or ran `warm_up` (a first step's one-time set-up is not training)."""
    _account_allocations()
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
    """Run the one-time set-up a process's first training step does (torch's compiler imported by
    the optimizer, oneDNN's kernels), so that it counts as the runtime's baseline, not as training."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 1, 6, 6)).sum().backward()
    optimizer.step()


def _memory_group() -> Path | None:
    """The cgroup v1 memory group this process is in, where this machine mounts one."""
    try:
        membership = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    return next((_CGROUP_V1 / path for controllers, path in _memberships(membership) if "memory" in controllers), None)


def enforcement() -> str:
    """How `run_within` holds a device to its budget here: "cgroup v1" where this process may
    create memory groups (resident memory, as a device's RAM counts it), else "RLIMIT_DATA"
    (virtual memory: stricter, since oneDNN's kernel code and glibc's reserves count too)."""
    group = _memory_group()
    return "cgroup v1" if group is not None and os.access(group, os.W_OK) else "RLIMIT_DATA"


def _device_group(pid: int) -> Path | None:
    group = _memory_group()
    return None if group is None else group / f"neulite-device-{pid}"


@contextmanager
def _held(budget: int, how: str) -> Iterator[None]:
    """This process held to `budget` more bytes than it holds now, as `enforcement()` says."""
    if how == "RLIMIT_DATA":
        with limited(budget):
            yield
        return
    _account_allocations()
    group = _device_group(os.getpid())
    assert group is not None
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(budget))
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
    allocation). glibc maps every block of 64 KiB or more on its own there, so what is held is what
    is used. `setup` and `work` must pickle (top-level functions, `functools.partial`); so must
    what they return. Raises `work`'s exception, or `OutOfMemory` when it needed more. `how`
    ("cgroup v1" or "RLIMIT_DATA") overrides `enforcement()`."""
    if not isinstance(budget, int) or budget <= 0:
        raise NeuliteError(f"run_within: budget must be a positive number of bytes, got {budget!r}")
    how = how or enforcement()
    if how not in ("cgroup v1", "RLIMIT_DATA"):
        raise NeuliteError(f'run_within: how must be "cgroup v1" or "RLIMIT_DATA", got {how!r}')
    # a fresh process: a fork's copy-on-write copies of this one's pages would be charged to it
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_device, args=(budget, how, setup, work, send), daemon=True)
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc as the child starts
    try:
        child.start()
    finally:
        if before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before
    send.close()
    group = _device_group(child.pid) if how == "cgroup v1" else None
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
            group.rmdir()
    if not ok:
        raise value
    return value
