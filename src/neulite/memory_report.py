"""`neulite memory`: NeuLite's per-stage training peaks next to full-model training, estimated and measured.

Each stage runs the step NeuLite's clients run (Mentor and Harmonizer on, the default λ curriculum),
through the same method object a run builds, so the report and a run's eligibility agree.
"""

from __future__ import annotations

from typing import Any

from neulite.algorithms.local import cross_entropy_loss
from neulite.algorithms.registry import build_method
from neulite.config import Config, ModelConfig, TrainConfig
from neulite.memory import estimate, measure
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model

MEASURED_WITH = "peak resident memory growth, fresh process, 1 thread, 2 training steps after a twin's warm-up step"
"""How `measure` reads a step's peak, recorded with every report (a benchmark re-measures rows read another way)."""


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
) -> dict[str, Any]:
    """Per-stage NeuLite peaks (Mentor and Harmonizer on) next to full-model training, estimated and
    measured; with `recompute`, of stages that recompute what they train in backward.

    `model` is any name a config takes: a built-in, a registered model or an import path "module:function"."""
    cfg = Config(
        model=ModelConfig(name=model, width=width, blocks=blocks),
        train=TrainConfig(batch_size=batch_size, recompute="on" if recompute else "off"),
    )
    net = StageNet(build_model(model, input_shape, num_classes, width, blocks))  # type: ignore[arg-type]
    full_plan = net.full_plan()
    full_est = estimate(net, full_plan, batch_size, cross_entropy_loss)
    full_real = measure(net, full_plan, batch_size, cross_entropy_loss) if with_measurement else None
    method = build_method(cfg, net)
    rows = []
    for plan in method.plans():
        est = method.memory(plan)
        real = measure(net, plan, batch_size, method.loss(method.task_config(plan))) if with_measurement else None
        rows.append(
            {
                "stage": plan.stage,
                "recompute": plan.recompute,
                "estimated_bytes": est.total,
                "measured_bytes": real,
                "breakdown": est.as_dict(),
            }
        )
    full = {"stage": 0, "estimated_bytes": full_est.total, "measured_bytes": full_real, "breakdown": full_est.as_dict()}
    for r in [full, *rows]:
        r["estimate_error"] = None if r["measured_bytes"] is None else r["estimated_bytes"] / r["measured_bytes"] - 1.0
    for r in rows:
        r["fraction_of_full"] = r["estimated_bytes"] / full["estimated_bytes"]
        if r["measured_bytes"] is not None:
            r["measured_fraction_of_full"] = r["measured_bytes"] / full["measured_bytes"]
    worst = max(r["fraction_of_full"] for r in rows)
    return {
        "model": model,
        "blocks": "one per resolution stage" if not blocks else f"{blocks} memory-balanced",
        "batch_size": batch_size,
        "input_shape": list(input_shape),
        "full": full,
        "stages": rows,
        "worst_stage_fraction": worst,
        "reduction_percent": 100.0 * (1.0 - worst),
        "measured_with": MEASURED_WITH if with_measurement else None,
    }
