"""Peak training memory of one client step: an exact-accounting estimate and a real measurement.

Both run the step a method's clients really run: its loss (`StepLoss`, given by the method) on
the stage's plan. The estimate follows every storage the forward and backward create until it is
freed (`LiveTensorBytes`) on top of what stays resident: exactly the tensors the client receives,
the optimizer's momentum and the batch. The saved-for-backward bytes are counted in the same pass,
as a diagnostic, and so are the step's floating-point operations (`step_flops`), what recomputation
costs in time. The measurement is the peak growth of resident memory over real training steps
(torch.cuda.max_memory_allocated on a GPU), in a fresh process.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import gc
import hashlib
import mmap
import multiprocessing
import os
import platform
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from neulite.errors import NeuliteError
from neulite.models.arrays import assign_arrays, extract_arrays
from neulite.models.stage_net import StageNet, StagePlan
from neulite.optim import SGD
from neulite.saved_tensors import SavedTensorCounter

MIB = 2**20

StepLoss = Callable[..., torch.Tensor]
"""A method's training objective for one batch: (net, plan, x, y, prefix=None) -> scalar loss, where
`prefix` is the output of the plan's frozen blocks for `x` when a `PrefixCache` holds it (passed on
to `StageNet.stage_forward`). Must pickle (a module-level function, or a `functools.partial` of one)
so `measure` can run it in a fresh process. Memory is estimated without a prefix: an upper bound."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of one training step's peak, by what holds them.

    `training` is the live peak of forward + backward over the resident state (saved activations,
    activation gradients, parameter gradients, kernel workspaces): with the resident weights,
    momentum and batch it makes the step's peak (`total`). `activations` (what autograd holds for
    backward when the forward ends) and `frozen_forward` (the transient peak of the no-grad prefix)
    are diagnostics: parts of that peak, reported to show where it comes from.
    """

    weights: int
    gradients: int
    optimizer: int
    batch: int
    activations: int
    frozen_forward: int
    training: int

    @property
    def total(self) -> int:
        resident = self.weights + self.optimizer + self.batch
        return resident + max(self.training, self.gradients)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


HEAP_BLOCK = mmap.PAGESIZE
"""Blocks from one page up get a mapping of their own (the measurement and an enforced device set
glibc's mmap threshold to it), returned to the system when freed, so resident memory follows
their live pages; smaller ones come from the heap, which keeps them resident once freed
(`LiveTensorBytes`). At 64 KiB the Mentor's 32-48 KiB Gram blocks came from the heap too, whose
fragmentation added up to 1 MiB (16%) to a weight-heavy CNN's small stages at batch 64, by an
order of allocations no estimate can follow; at one page the same stages measure within 3%."""

MAPPING_OVERHEAD = 80
"""Bytes a mapped block needs beyond its storage: glibc's chunk header and the 64-byte alignment
torch's CPU allocator asks for."""


def footprint(size: int) -> int:
    """Bytes a storage of `size` holds: itself on the heap, whole pages when it is mapped."""
    if size < HEAP_BLOCK:
        return size
    return -(-(size + MAPPING_OVERHEAD) // mmap.PAGESIZE) * mmap.PAGESIZE


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of every storage an op creates until it is freed, and their peak.

    Seeing tensors rather than allocator calls, it counts what a training step holds on any
    device, plus the one workspace kernels hold that no tensor shows (`_kernel_workspace`); the
    resident-memory measurement (`measure`) is the independent check. Storages smaller than
    `HEAP_BLOCK` come from the C heap, which keeps a freed block resident for the next small
    request rather than returning it: their peak stays resident for the rest of the step and
    the steps after it, so `peak` adds it to the peak of the larger storages, which are unmapped
    when freed (in whole pages: `footprint`). A sum of two gradients counts as the engine does it
    outside a dispatch mode (`_settle`). On the way it adds up the floating-point operations of the
    ops torch has a formula for (convolutions, matrix products, attention): `flops`.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """False: torch wraps a mode's `__torch_dispatch__` to keep its compiler out otherwise, and
        the wrapper's first call imports that compiler (3.5 s and 71 MiB of every process that
        estimates: a server, `neulite plan`). No estimate runs under `torch.compile`."""
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.flops = 0
        self.heap = 0
        self.heap_peak = 0
        self.mapped_peak = 0
        self._seen: set[int] = set()
        self._pending: tuple[int, int, int, int] | None = None

    @property
    def peak(self) -> int:
        self._settle()
        return self.mapped_peak + self.heap_peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self._settle()
        before = self.mapped_peak
        out = func(*args, **(kwargs or {}))
        if (flops := flop_registry.get(func._overloadpacket)) is not None:
            self.flops += flops(*args, **(kwargs or {}), out_val=out)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in inputs:  # views are not new memory
                self._track(t.untyped_storage())
        self.mapped_peak = max(self.mapped_peak, self.live - self.heap + _kernel_workspace(func, args, out))
        summed = args[0].untyped_storage().data_ptr() if _accumulates(func, args, out) else None
        if summed in self._seen and (size := footprint(out.untyped_storage().nbytes())) >= HEAP_BLOCK:
            self._pending = (
                summed,
                self.mapped_peak,
                before,
                self.live - self.heap - size,
            )
            self.mapped_peak = before
        return out

    def _settle(self) -> None:
        """Account the last op if it summed two gradients: the autograd engine sums them into the
        first one's buffer when it holds that buffer's last reference, which it shows by freeing it
        right after; under a dispatch mode (this one) it always allocates the sum anew."""
        if self._pending is None:
            return
        summed, out_of_place, before, in_place = self._pending
        self._pending = None
        self.mapped_peak = max(self.mapped_peak, out_of_place if summed in self._seen else max(before, in_place))

    def _track(self, storage: torch.UntypedStorage) -> None:
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in self._seen or size == 0:
            return
        self._seen.add(ptr)
        size = footprint(size)
        heap = size if size < HEAP_BLOCK else 0
        self.live += size
        self.heap += heap
        self.heap_peak = max(self.heap_peak, self.heap)
        self.mapped_peak = max(self.mapped_peak, self.live - self.heap)
        weakref.finalize(storage, self._release, ptr, size, heap)

    def _release(self, ptr: int, size: int, heap: int) -> None:
        self.live -= size
        self.heap -= heap
        self._seen.discard(ptr)


def _accumulates(func: object, args: tuple, out: object) -> bool:
    """Whether an op is the autograd engine summing two gradients of one tensor (a sum in backward
    of two tensors of the output's shape, the first contiguous)."""
    return (
        func is torch.ops.aten.add.Tensor
        and torch._C._current_graph_task_id() != -1
        and isinstance(args[1], torch.Tensor)
        and args[0].shape == args[1].shape == out.shape
        and args[0].is_contiguous()
    )


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or result (tensors, lists, tuples and dicts of them): the
    estimate's hottest path, where torch's general pytree walk took a fifth of the time."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _kernel_workspace(func: object, args: tuple, out: object) -> int:
    """Bytes a convolution holds on top of its outputs while it runs (the estimate runs on a CPU).

    oneDNN, torch's CPU convolution library, computes on private copies of a convolution's tensors
    in its own blocked layout. Forward, it copies the input and the weights and writes a blocked
    output that is then copied out to the dense result. Backward runs in phases, each freeing its
    copies before the next: the input gradient from copies of the output gradient and weights,
    then the weight gradient, in the blocked layout, from copies of the output gradient and input,
    then that gradient reordered into the dense result. Beyond the two results, the phases hold
    the output gradient, the output gradient and the input, and the weights' size: an
    activation-heavy layer needs a second copy of its activations, a weight-heavy one of its
    weights. A strided (not grouped) convolution's input gradient is computed in a buffer of its
    own and copied out, so its backward holds up to twice its input besides. (Counting all three
    copies at once put a weight-heavy CNN's stage 12-14% above its measurement, and leaving out the
    strided buffer a VGG-like CNN's 7-8% below. Single layers measure within 0.2 MiB of this model
    or, strided, up to 2.4 MiB below it; whole networks measure as benchmarks/README.md shows.)
    """
    if func is torch.ops.aten.convolution.default:
        return max(_bytes(args[0]) + _bytes(args[1]), _bytes(out))
    if func is torch.ops.aten.convolution_backward.default:
        grad_output, x, weight, stride, groups = args[0], args[1], args[2], args[4], args[9]
        strided = 2 * _bytes(x) if max(stride) > 1 and groups == 1 else 0
        return max(_bytes(grad_output) + _bytes(x), _bytes(weight), strided)
    return 0


PROBE_BATCH = 256
"""Largest batch the estimate runs a real step at: beyond it, the batch-dependent bytes are
extrapolated linearly from steps at half and all of it, so no batch size can exhaust the host."""


_ESTIMATES: OrderedDict[tuple, tuple[MemoryBreakdown, int]] = OrderedDict()
_MAX_CACHED = 1 << 14
"""Estimates a process keeps, least recently used out first: a digest keys the architecture, so
an entry is a few hundred bytes, and a planner's thousands of recomputation variants all stay."""


def estimate(net: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss) -> MemoryBreakdown:
    """Account for the peak of one training step of `plan` with `loss` at `batch_size` (fp32, SGD with momentum).

    The peak depends on the network's architecture and tensor shapes, never on its values, so an
    estimate is computed once per process for each (architecture, plan, batch size, loss)."""
    return _estimated(net, plan, batch_size, loss)[0]


def step_flops(net: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss) -> int:
    """Floating-point operations of the same step (`estimate`), forwards re-run in backward
    included: recomputation's cost in time, where convolutions and matrix products dominate it."""
    return _estimated(net, plan, batch_size, loss)[1]


def _estimated(net: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss) -> tuple[MemoryBreakdown, int]:
    layout = tuple((name, t.dtype, tuple(t.shape)) for name, t in net.state_dict().items())
    architecture = repr((repr(net), layout, tuple(net.model.input_shape)))  # same layers, other inputs: other peaks
    digest = hashlib.sha256(architecture.encode()).digest()
    key = (digest, plan, batch_size, repr(loss))
    if key in _ESTIMATES:
        _ESTIMATES.move_to_end(key)
    else:
        _ESTIMATES[key] = _estimate(_working_copy(net, digest), plan, batch_size, loss)
        if len(_ESTIMATES) > _MAX_CACHED:
            _ESTIMATES.popitem(last=False)
    return _ESTIMATES[key]


_WORKING: dict[bytes, StageNet] = {}


def _working_copy(net: StageNet, digest: bytes) -> StageNet:
    """The copy of `net` the estimate runs its steps on, made once for the architecture `digest`:
    a step changes only values (BatchNorm statistics, gradients, which it drops), never what the
    next estimate counts, and copying a ResNet took a quarter of each estimate. One architecture
    is kept at a time: an estimate's callers ask for one network's plans in a row."""
    if digest not in _WORKING:
        _WORKING.clear()
        _WORKING[digest] = copy.deepcopy(net)
    return _WORKING[digest]


def _estimate(work: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss) -> tuple[MemoryBreakdown, int]:
    if batch_size <= PROBE_BATCH:
        return _account(work, plan, batch_size, loss)
    (half, _), (full, flops) = _account(work, plan, PROBE_BATCH // 2, loss), _account(work, plan, PROBE_BATCH, loss)
    scale = (batch_size - PROBE_BATCH) / (PROBE_BATCH - PROBE_BATCH // 2)

    def grow(field: str) -> int:
        a, b = getattr(half, field), getattr(full, field)
        return round(b + (b - a) * scale)

    grown = dataclasses.replace(full, **{f: grow(f) for f in ("batch", "activations", "frozen_forward", "training")})
    return grown, flops * batch_size // PROBE_BATCH


def _account(work: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss) -> tuple[MemoryBreakdown, int]:
    params = work.prepare(plan)
    generator = torch.Generator().manual_seed(0)  # the global RNG is the experiment's: never drawn from here
    x = torch.randn(batch_size, *work.model.input_shape, generator=generator)
    y = torch.randint(0, work.model.num_classes, (batch_size,), generator=generator)
    with LiveTensorBytes() as prefix:
        work.frozen_output(x, plan)
    counter = SavedTensorCounter([*work.parameters(), x, y])
    try:
        with LiveTensorBytes() as step, counter.hooks():
            value = loss(work, plan, x, y)
            saved = sum(counter.held().values())
            value.backward()
            del value
    finally:
        work.zero_grad(set_to_none=True)  # the next estimate's backward allocates its gradients anew
    trainable = sum(_bytes(p) for p in params)
    weights = sum(_bytes(t) for t in extract_arrays(work, work.down_names(plan)).values())
    breakdown = MemoryBreakdown(
        weights=weights,
        gradients=trainable,
        optimizer=trainable,
        batch=_bytes(x) + _bytes(y),
        activations=saved,
        frozen_forward=prefix.peak,
        training=step.peak,
    )
    return breakdown, step.flops


def measure(
    net: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss, *, device: str = "cpu", steps: int = 2
) -> int:
    """The real peak bytes of `steps` training steps of a client that received only its tensors.

    On a CPU that is the growth of resident memory, the memory a host really backs (see
    `_measure_here`). It runs in a fresh process (forked from a server that only imported torch
    and neulite, or spawned), so nothing this process holds or has freed blurs the figure. Its output stays out of the terminal, and if it cannot start (a script
    that calls this outside `if __name__ == "__main__":` re-runs itself in the child) the call fails
    at once saying so, instead of waiting forever.
    """
    check_device(device)
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "neulite.memory"])  # a measurement forks from them, imported once
    else:
        ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_measure_child, args=(send, net, plan, batch_size, loss, device, steps))
    # the child gets the tensors in shared memory, each named by a file: handed over as file
    # descriptors (torch's default), a forkserver takes at most 256, fewer than a ResNet-34 with its
    # scaffolding holds
    sharing = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        child.start()  # a forkserver that died re-running an unguarded script breaks the pipe here
        send.close()
        outcome = receive.recv()  # a child that did so ends the pipe here
    except (EOFError, BrokenPipeError):
        outcome = (
            "error",
            "the measuring process died before it measured; a script that calls neulite.memory.measure must do so "
            'under `if __name__ == "__main__":` (the spawned process re-imports the script)',
        )
    finally:
        torch.multiprocessing.set_sharing_strategy(sharing)
        if child.pid is not None:
            child.join()
    kind, value = outcome
    if kind == "error":
        raise NeuliteError(f"memory measurement failed: {value}")
    return value


def check_device(device: str) -> None:
    """Refuse a device this host cannot train on, by name, before any work starts."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise NeuliteError(f"unknown device {device!r} (use 'cpu' or 'cuda')") from None
    if kind not in ("cpu", "cuda"):
        raise NeuliteError(f"device {device!r}: memory is measured on 'cpu' or 'cuda' only")
    if kind == "cuda" and not torch.cuda.is_available():
        raise NeuliteError(f"device {device!r}: torch sees no CUDA device on this host")


def _measure_child(send: Connection, *args: Any) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the libraries' own log lines are not the user's business
    os.dup2(devnull, 2)
    try:
        send.send(("bytes", _measure_here(*args)))
    except Exception as exc:
        send.send(("error", f"{type(exc).__name__}: {exc}"))


def _measure_here(net: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss, device: str, steps: int) -> int:
    """The client starts from a meta-device skeleton, so the weights it holds are exactly its
    payload; everything it allocates from then on is inside the measured window.

    On a CPU the figure is resident memory, not allocated memory: oneDNN asks the allocator for
    scratchpads it never writes (its gemm-based weight-gradient kernel, picked for layers with
    tiny output maps, books four times the weights per thread and on one thread writes none of
    it), and untouched pages cost a host nothing. Kernels run on one thread, as the estimate
    assumes: on T threads that kernel writes a partial weight gradient per thread, a cost of the
    host's core count rather than of the step. A twin client's step first compiles the kernels
    and fills the libraries' caches, which a process pays once, not per client (on a GPU too:
    cuBLAS's workspace, cuDNN's plans).
    """
    torch.set_num_threads(1)
    arrays = {k: v.to(device) for k, v in extract_arrays(net, net.down_names(plan)).items()}
    skeleton = copy.deepcopy(net).to("meta")

    def run(client: StageNet, n: int) -> None:
        assign_arrays(client, arrays)
        params = client.prepare(plan)
        optimizer = SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)  # the default client optimizer
        xb = torch.randn(batch_size, *net.model.input_shape, device=device)
        yb = torch.randint(0, net.model.num_classes, (batch_size,), device=device)
        for _ in range(n):
            value = loss(client, plan, xb, yb)
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
            del value

    cuda = device.startswith("cuda")
    libc = None if cuda else map_blocks_alone("measuring CPU memory")
    run(copy.deepcopy(skeleton), 1)  # the twin's warm-up step
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(skeleton, steps)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    peaks = []
    for _ in range(MEASURE_REPEATS):
        client = copy.deepcopy(skeleton)
        gc.collect()
        libc.malloc_trim(0)
        peaks.append(_resident_growth(functools.partial(run, client, steps)))
        del client
    return min(peaks)


MEASURE_REPEATS = 2
"""A busy host now and then adds a few hundred KiB to a step's resident peak (measured: +0.4 MiB
on 13 MiB with the other core loaded) and never takes any away: the lesser of two is the step's."""


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_blocks_alone(purpose: str) -> ctypes.CDLL:
    """Make glibc give every block of `HEAP_BLOCK` or more a mapping of its own, returned when freed,
    and hand back the free top of its heap: the process's resident memory then follows its live
    tensors, as the estimate counts them (at a cost in speed: a step of the default model took 2.2x
    as long, every large block's pages being faulted in anew). Returns glibc; `purpose` names what
    needs it in the error on a host without it."""
    libc = ctypes.CDLL(None) if sys.platform == "linux" and platform.libc_ver()[0] == "glibc" else None
    if libc is None or libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK) != 1:
        raise NeuliteError(f"{purpose} needs Linux with glibc (mallopt, resident memory in /proc)")
    libc.malloc_trim(0)
    return libc


def _resident_growth(step: Callable[[], None]) -> int:
    """Peak resident bytes while `step` runs, above those resident when it starts."""
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restarts the high-water mark (VmHWM) from the current resident size
    step()
    return _status_bytes("VmHWM") - base


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024
