"""What travels between the Flower ServerApp and ClientApps, as Flower records.

A task goes down as `RecordDict{"arrays": only the stage's tensors, "config": round, seed, the
stage plan and the `model.blocks` the server's network has (a planned "auto" resolved, so that a
node does not plan again for every message), "method-config": the method's own knobs}`; a result comes up as `{"arrays": only the
trained tensors, "metrics": num-examples and train_loss}`. Plans are rebuilt by type name from
`StagePlan.types`, where every kind of plan registers itself, so this format knows no method.

Decoding a reply checks its tensors' metadata against what the task asked for before deserialising
them, so a malformed reply is a `NeuliteError` naming the problem, never a crash inside aggregation;
the server then checks the values (`Server.accept`), as it does for the in-process simulator.
"""

from __future__ import annotations

import dataclasses
import math

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from neulite.algorithms.base import Spec
from neulite.algorithms.payload import ClientResult, ClientTask, check_layout
from neulite.errors import NeuliteError
from neulite.models.arrays import Arrays
from neulite.models.stage_net import StagePlan
from neulite.planner import MAX_BLOCKS

NPY_HEADER_BYTES = 4096
"""Room for the .npy header Flower wraps each tensor's bytes in (about 128 bytes in practice)."""


def encode_plan(plan: StagePlan) -> dict[str, int | bool | str]:
    return {
        "plan-type": type(plan).__name__,
        **{f"plan-{f.name}": getattr(plan, f.name) for f in dataclasses.fields(plan)},
    }


def decode_plan(config: ConfigRecord) -> StagePlan:
    cls = StagePlan.types.get(str(config.get("plan-type")))
    if cls is None:
        raise NeuliteError(f"malformed task: unknown plan type {config.get('plan-type')!r}")
    values = {}
    for f in dataclasses.fields(cls):  # a plan's fields are ints and bools (bool is no int here)
        value = values[f.name] = config[f"plan-{f.name}"]
        if type(value).__name__ != f.type:
            raise NeuliteError(f"malformed task: plan-{f.name} must be {f.type}, got {value!r}")
    return cls(**values)


def _arrays(record: RecordDict) -> Arrays:
    if "arrays" not in record.array_records:
        raise NeuliteError("malformed message: no 'arrays' record")
    return dict(record.array_records["arrays"].to_torch_state_dict())


def encode_task(task: ClientTask, model_blocks: int) -> RecordDict:
    config = ConfigRecord(
        {"round": task.round, "seed": task.seed, "model-blocks": model_blocks, **encode_plan(task.plan)}
    )
    return RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=task.arrays),
            "config": config,
            "method-config": ConfigRecord(dict(task.config)),
        }
    )


def decode_task(record: RecordDict) -> ClientTask:
    try:
        c = record.config_records["config"]
        method_config = dict(record.config_records["method-config"])
        return ClientTask(int(c["round"]), decode_plan(c), _arrays(record), int(c["seed"]), method_config)
    except KeyError as exc:
        raise NeuliteError(f"malformed task: missing {exc}") from None


def task_blocks(record: RecordDict) -> int:
    """The `model.blocks` a task's network was built with."""
    value = record.config_records["config"].get("model-blocks") if "config" in record.config_records else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BLOCKS:
        raise NeuliteError(f"malformed task: model-blocks must be an integer in [0, {MAX_BLOCKS}], got {value!r}")
    return value


def encode_result(result: ClientResult) -> RecordDict:
    metrics = MetricRecord({"num-examples": result.num_examples, **result.metrics})
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=result.arrays), "metrics": metrics})


def decode_result(record: RecordDict, spec: Spec, required: tuple[str, ...] = ("train_loss",)) -> ClientResult:
    """The reply as a `ClientResult` holding the `required` metrics. Its tensors' names, shapes,
    dtypes and byte sizes are checked against `spec` before any is deserialised, so an oversized
    reply costs nothing more; the server then checks the values like any driver's replies."""
    metrics = record.metric_records.get("metrics")
    if metrics is None or "num-examples" not in metrics:
        raise NeuliteError("malformed reply: no 'metrics' record with num-examples")
    if not isinstance(metrics["num-examples"], int):
        raise NeuliteError(f"malformed reply: num-examples is {metrics['num-examples']!r}, not an integer")
    values = {k: float(v) for k, v in metrics.items() if k != "num-examples" and isinstance(v, (int, float))}
    if missing := [k for k in required if k not in values]:
        raise NeuliteError(f"malformed reply: no {missing[0]} metric")
    check_sizes(record, spec)
    return ClientResult(_arrays(record), metrics["num-examples"], values)


def check_sizes(record: RecordDict, spec: Spec) -> None:
    """Names, shapes, dtypes and byte sizes of the reply's serialised tensors against `spec`."""
    if "arrays" not in record.array_records:
        raise NeuliteError("malformed message: no 'arrays' record")
    arrays = record.array_records["arrays"]
    check_layout({name: (tuple(a.shape), a.dtype) for name, a in arrays.items()}, spec)
    for name, (shape, dtype) in spec.items():
        limit = math.prod(shape) * dtype.itemsize + NPY_HEADER_BYTES
        if len(arrays[name].data) > limit:
            raise NeuliteError(
                f"malformed reply: {name!r} carries {len(arrays[name].data)} bytes, more than its shape needs"
            )
