"""`neulite memory`: NeuLite's per-stage training peaks next to full-model training, estimated and measured.

Each stage runs the step NeuLite's clients run (Mentor and Harmonizer on, the default λ curriculum),
through the same method object a run builds, so the report and a run's eligibility agree.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any

import torch

from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.neulite import NeuLite
from neulite.algorithms.registry import build_method
from neulite.config import Config, ModelConfig, TrainConfig
from neulite.errors import NeuliteError
from neulite.memory import MIB, StepLoss, check_device, estimate, measure, step_flops
from neulite.models.stage_net import StageNet, StagePlan
from neulite.models.zoo import build_model
from neulite.optim import SGD

PLAN_FIELDS = ("recompute", "segment", "recompute_prefix", "kept_segments", "recompute_inner")
"""What a stage row records of its plan: a measurement is of that plan, and no other."""

MEASURED_WITH = (
    "peak resident memory growth, fresh process, 1 thread, glibc mapping every block from a page up, "
    "2 training steps after a twin's warm-up step, lesser of 2"
)
"""How `measure` reads a step's peak on a CPU, recorded with every report (a benchmark re-measures
rows read another way)."""
CUDA_MEASURED_WITH = (
    "torch.cuda.max_memory_allocated growth, fresh process, 2 training steps after a twin's warm-up step"
)


def blocks_label(blocks: int) -> str:
    """How a report names its cut (`model.blocks`)."""
    return "one per resolution stage" if not blocks else f"{blocks} memory-balanced"


def measured_with(device: str) -> str:
    """How `measure` reads a step's peak on `device`."""
    return CUDA_MEASURED_WITH if device.startswith("cuda") else MEASURED_WITH


def memory_report(
    model: str,
    batch_size: int,
    input_shape: tuple[int, ...],
    num_classes: int = 10,
    width: float = 1.0,
    blocks: int = 0,
    *,
    with_measurement: bool = True,
    recompute: bool = False,
    budget: float | None = None,
    with_timing: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Per-stage NeuLite peaks (Mentor and Harmonizer on) next to full-model training, estimated and
    measured; with `recompute`, of stages that recompute what they train in backward; with `budget`
    (a share of full-model training's estimated peak), of what train.recompute = "auto" gives a
    client with that budget (`NeuLite.fitting`: the stage as planned, else its cheapest recomputing
    rung that fits). Each row's `estimated_flops` (`step_flops`), a recomputing stage's
    `plain_estimated_flops` too (the same stage without recomputation: the operations it adds).
    With `with_timing`, each row's `step_seconds` (`step_seconds`), and a
    recomputing stage's `plain_step_seconds`: the same stage without recomputation, its steps taken
    in turn with the recomputing one's, so that the machine's drift between them cancels. Measured
    and timed on `device` ("cuda": the GPU's allocated bytes); the estimate is the same for every device.

    `model` is any name a config takes: a built-in, a registered model or an import path "module:function"."""
    check_device(device)
    cfg = Config(
        model=ModelConfig(name=model, width=width, blocks=blocks),
        train=TrainConfig(batch_size=batch_size, recompute="auto" if budget else "on" if recompute else "off"),
    )
    net = StageNet(build_model(model, input_shape, num_classes, width, blocks))  # type: ignore[arg-type]
    full_plan = net.full_plan()
    full_est = estimate(net, full_plan, batch_size, cross_entropy_loss)
    full_real = measure(net, full_plan, batch_size, cross_entropy_loss, device=device) if with_measurement else None
    method = build_method(cfg, net)
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, recompute="off"))
    plain = build_method(off, net) if recompute and not budget else method  # each stage without recomputing
    plans = method.plans()
    if budget:
        plans = [_fitting(method, plan, int(budget * full_est.total)) for plan in plans]
    stages = [
        (plan, method.loss(method.task_config(plan)), unrecomputed)
        for plan, unrecomputed in zip(plans, plain.plans(), strict=True)
    ]
    rows = []
    for plan, step_loss, unrecomputed in stages:
        est = method.memory(plan)
        real = measure(net, plan, batch_size, step_loss, device=device) if with_measurement else None
        rows.append(
            {
                "stage": plan.stage,
                **{field: getattr(plan, field) for field in PLAN_FIELDS},
                "estimated_bytes": est.total,
                "measured_bytes": real,
                "breakdown": est.as_dict(),
                "estimated_flops": method.flops(plan),
                **({"plain_estimated_flops": plain.flops(unrecomputed)} if plan.recompute else {}),
            }
        )
    full = {
        "stage": 0,
        "estimated_bytes": full_est.total,
        "measured_bytes": full_real,
        "breakdown": full_est.as_dict(),
        "estimated_flops": step_flops(net, full_plan, batch_size, cross_entropy_loss),
    }
    if with_timing:
        (full["step_seconds"],) = step_seconds(net, [(full_plan, cross_entropy_loss)], batch_size, device=device)
        for (plan, step_loss, unrecomputed), r in zip(stages, rows, strict=True):
            twin = [(unrecomputed, plain.loss(plain.task_config(unrecomputed)))] if plan.recompute else []
            r["step_seconds"], *paired = step_seconds(net, [(plan, step_loss), *twin], batch_size, device=device)
            if paired:
                r["plain_step_seconds"] = paired[0]
    report = {
        "model": model,
        "blocks": blocks_label(blocks),
        "batch_size": batch_size,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "width": width,
        "full": full,
        "stages": rows,
        "device": device,
        "measured_with": measured_with(device) if with_measurement else None,
        **({"budget_fraction": budget} if budget else {}),
    }
    return _compared(report)


def _fitting(method: NeuLite, plan: StagePlan, budget: int) -> StagePlan:
    """What train.recompute = "auto" gives a client with `budget` bytes at `plan`'s stage."""
    fitting = method.fitting(plan, budget)
    if fitting is None:
        peak = method.memory(method.recomputing(plan)).total
        raise NeuliteError(
            f"stage {plan.stage} needs {peak / MIB:.1f} MiB even recomputing, over the budget of {budget / MIB:.1f} MiB"
        )
    return fitting


def _compared(report: dict[str, Any]) -> dict[str, Any]:
    """`report` with each row's estimate error and share of full-model training, and the worst stage's."""
    full, rows = report["full"], report["stages"]
    for r in [full, *rows]:
        r["estimate_error"] = None if r["measured_bytes"] is None else r["estimated_bytes"] / r["measured_bytes"] - 1.0
    for r in rows:
        r["fraction_of_full"] = r["estimated_bytes"] / full["estimated_bytes"]
        if r["measured_bytes"] is not None:
            r["measured_fraction_of_full"] = r["measured_bytes"] / full["measured_bytes"]
    worst = max(r["fraction_of_full"] for r in rows)
    return {**report, "worst_stage_fraction": worst, "reduction_percent": 100.0 * (1.0 - worst)}


def reestimated(report: dict[str, Any], retime: bool = False) -> dict[str, Any]:
    """`report` (one of `memory_report`'s) with today's estimates next to its measurements and step
    times: what a change to the estimator does to a table whose measurements it cannot change.
    With `retime`, its steps timed again too (on a machine quieter than the one that timed them).
    Refused where the estimator now plans a stage another way (another recomputation segment, or
    the frozen prefix recomputed or not): its measurement is of the old plan."""
    blocks = 0 if report["blocks"] == "one per resolution stage" else int(report["blocks"].split()[0])
    fresh = memory_report(
        report["model"],
        report["batch_size"],
        tuple(report["input_shape"]),
        report.get("num_classes", 10),  # rows written before these were recorded used the defaults
        report.get("width", 1.0),
        blocks,
        with_measurement=False,
        recompute=report.get("recompute", False),
        budget=report.get("budget_fraction"),
        with_timing=retime,
        device=report.get("device", "cpu"),
    )
    rows = []
    for new, old in zip(fresh["stages"], report["stages"], strict=True):
        for field in PLAN_FIELDS:
            if new[field] != (was := old.get(field, StagePlan.__dataclass_fields__[field].default)):
                raise NeuliteError(
                    f"{report['model']} at batch {report['batch_size']}: stage {new['stage']} now plans "
                    f"{field} = {new[field]}, measured with {was}: measure the row again"
                )
    for new, old in zip([fresh["full"], *fresh["stages"]], [report["full"], *report["stages"]], strict=True):
        kept = {
            k: v
            for k, v in old.items()
            if k in ("measured_bytes", "rss_check_bytes", *(() if retime else ("step_seconds", "plain_step_seconds")))
        }
        rows.append({**new, **kept})
    return _compared({**report, "full": rows[0], "stages": rows[1:]})


def step_seconds(
    net: StageNet, runs: list[tuple[StagePlan, StepLoss]], batch_size: int, steps: int = 5, device: str = "cpu"
) -> list[float]:
    """Median wall seconds of one training step of each (plan, loss) on `device` (a CPU: this
    process's torch threads), the runs' steps taken in turn, after a warm-up step each (kernel
    selection and caches are a process's once, not a step's)."""
    x = torch.randn(batch_size, *net.model.input_shape, device=device)
    y = torch.randint(0, net.model.num_classes, (batch_size,), device=device)
    clients = [copy.deepcopy(net).to(device) for _ in runs]
    optimizers = [
        SGD(client.prepare(plan), lr=0.01, momentum=0.9) for client, (plan, _) in zip(clients, runs, strict=True)
    ]
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(steps + 1):
        for client, optimizer, (plan, loss), taken in zip(clients, optimizers, runs, times, strict=True):
            start = time.perf_counter()
            loss(client, plan, x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # the step's kernels have run, not just been queued
            taken.append(time.perf_counter() - start)
    return [statistics.median(taken[1:]) for taken in times]
