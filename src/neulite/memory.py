"""Peak training memory of one client step: an exact-accounting estimate and a real measurement.

The estimate runs one forward pass at the real batch size and counts, with
`saved_tensors_hooks`, every storage autograd keeps for backward (each once, parameters left
out). Weights are exactly the tensors the client receives; gradients and optimizer state follow
from the trainable parameters. The measurement is the allocator's high-water mark of two real
training steps seen by torch.profiler (or torch.cuda.max_memory_allocated on a GPU).
"""

from __future__ import annotations

import copy
import multiprocessing
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from neulite.algorithms.local import make_optimizer, prepare, stage_loss
from neulite.algorithms.payload import assign_arrays, extract_arrays
from neulite.config import TrainConfig
from neulite.models.stage_net import StageNet, StagePlan
from neulite.models.zoo import build_model
from neulite.saved_tensors import SavedTensorCounter

MIB = 2**20


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of one training step's peak, by what holds them.

    `activations` are the tensors autograd saves for backward; `frozen_forward` the transient
    peak of the no-grad prefix; `training` the live peak of forward + backward over the resident
    state (saved activations, activation gradients, parameter gradients, kernel workspaces), which
    is what the step's peak is made of.
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


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of every storage an op creates until it is freed, and their peak.

    Seeing tensors rather than allocator calls, it counts what a training step holds on any
    device; the allocator-level measurement (`measure`) is the independent check.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # views are not new memory
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in self._seen or size == 0:
            return
        self._seen.add(ptr)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, ptr, size)

    def _release(self, ptr: int, size: int) -> None:
        self.live -= size
        self._seen.discard(ptr)


def estimate(
    net: StageNet, plan: StagePlan, batch_size: int, *, mentor_active: bool | None = None, sigma: float = 5.0, bn_drift: bool = False
) -> MemoryBreakdown:
    """Account for the peak of a training step of `plan` at `batch_size` (fp32, SGD with momentum)."""
    work = copy.deepcopy(net)
    params = prepare(work, plan, bn_drift)
    x = torch.randn(batch_size, *work.model.input_shape)
    y = torch.randint(0, work.model.num_classes, (batch_size,))
    mentor = plan.mentor if mentor_active is None else mentor_active
    lam = 1.0 if mentor else 0.0
    n_frozen = 0 if plan.full else plan.stage - 1
    with torch.no_grad(), LiveTensorBytes() as prefix:
        h = x
        for block in work.model.blocks[:n_frozen]:
            h = block(h)
        del h
    counter = SavedTensorCounter([*work.parameters(), x, y])
    with counter.hooks():
        stage_loss(work, plan, x, y, lam, lam, sigma)
    with LiveTensorBytes() as step:
        loss, _ = stage_loss(work, plan, x, y, lam, lam, sigma)
        loss.backward()
        del loss
    trainable = sum(_bytes(p) for p in params)
    weights = sum(_bytes(t) for t in extract_arrays(work, work.down_names(plan)).values())
    return MemoryBreakdown(
        weights=weights,
        gradients=trainable,
        optimizer=trainable,
        batch=_bytes(x) + _bytes(y),
        activations=counter.total,
        frozen_forward=prefix.peak,
        training=step.peak,
    )


def _peak_from_profile(prof: profile) -> int:
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(
    net: StageNet, plan: StagePlan, batch_size: int, *, mentor_active: bool | None = None, sigma: float = 5.0, device: str = "cpu", steps: int = 2
) -> int:
    """The real peak bytes of `steps` training steps of a client that received only its tensors.

    Runs in a fresh process: the CPU profiler's memory events are only complete in a process's
    first profiling session.
    """
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure_here, (net, plan, batch_size, mentor_active, sigma, device, steps))


def _measure_here(
    net: StageNet, plan: StagePlan, batch_size: int, mentor_active: bool | None, sigma: float, device: str, steps: int
) -> int:
    """The client starts from a meta-device skeleton, so the weights it holds are exactly its
    payload; everything it allocates from then on is inside the measured window."""
    arrays = {k: v.to(device) for k, v in extract_arrays(net, net.down_names(plan)).items()}
    skeleton = copy.deepcopy(net).to("meta")
    mentor = plan.mentor if mentor_active is None else mentor_active
    lam = 1.0 if mentor else 0.0
    cfg = TrainConfig(batch_size=batch_size)

    def run() -> None:
        assign_arrays(skeleton, arrays)
        params = prepare(skeleton, plan, False)
        optimizer = make_optimizer(params, cfg)
        xb = torch.randn(batch_size, *net.model.input_shape, device=device)
        yb = torch.randint(0, net.model.num_classes, (batch_size,), device=device)
        for _ in range(steps):
            loss, _ = stage_loss(skeleton, plan, xb, yb, lam, lam, sigma)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return _peak_from_profile(prof)


def memory_report(
    model: str, batch_size: int, input_shape: tuple[int, ...], num_classes: int = 10, width: float = 1.0, blocks: int = 0, *, with_measurement: bool = True
) -> dict[str, Any]:
    """Per-stage NeuLite peaks (Mentor and Harmonizer on) next to full-model training, estimated and measured."""
    net = StageNet(build_model(model, input_shape, num_classes, width, blocks))  # type: ignore[arg-type]
    plans = [net.plan(0)] + [net.plan(t, harmonize=True, mentor=True) for t in range(1, net.num_stages + 1)]
    rows = []
    for plan in plans:
        est = estimate(net, plan, batch_size)
        real = measure(net, plan, batch_size) if with_measurement else None
        rows.append({
            "stage": plan.stage,
            "estimated_bytes": est.total,
            "measured_bytes": real,
            "estimate_error": None if real is None else est.total / real - 1.0,
            "breakdown": est.as_dict(),
        })
    full, stages = rows[0], rows[1:]
    for r in stages:
        r["fraction_of_full"] = r["estimated_bytes"] / full["estimated_bytes"]
        if r["measured_bytes"] is not None:
            r["measured_fraction_of_full"] = r["measured_bytes"] / full["measured_bytes"]
    worst = max(r["fraction_of_full"] for r in stages)
    return {
        "model": model,
        "blocks": "one per resolution stage" if not blocks else f"{blocks} memory-balanced",
        "batch_size": batch_size,
        "input_shape": list(input_shape),
        "full": full,
        "stages": stages,
        "worst_stage_fraction": worst,
        "reduction_percent": 100.0 * (1.0 - worst),
        "measured_with": "torch.profiler allocator events, fresh process, 2 training steps" if with_measurement else None,
    }
