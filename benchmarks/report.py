"""Write benchmarks/README.md, and the results summary in README.md, from the committed JSON.

Every figure on those pages comes from benchmarks/results/*.json (memory, accuracy, compute,
speed, flower, tune-*), which the benchmark scripts write; nothing is typed in by hand.

Run: python benchmarks/report.py           rewrite benchmarks/README.md and README.md's summary block
     python benchmarks/report.py --check   exit 1, saying which file, if either is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from neulite.compare import LATE_EVALUATIONS, UNRECORDED_HOST
from neulite.memory import MIB

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BENCH_README = HERE / "README.md"
TOP_README = ROOT / "README.md"
SUMMARY_BEGIN = "<!-- results summary: written by `python benchmarks/report.py` from benchmarks/results/*.json; edit report.py, not this block -->"
SUMMARY_END = "<!-- end of results summary -->"
RECOMPUTE_TIME_TARGET = 0.35  # the most recomputation may add to a stage's step

# Keys that moved into their method's own config section after some sweeps ran: shown in today's
# spelling so that a reader can paste them.
_RENAMED = {
    "depthfl_kd_weight": "method.depthfl.kd_weight",
    "depthfl_temperature": "method.depthfl.temperature",
    "profl_window": "method.profl.window",
    "profl_threshold": "method.profl.threshold",
    **{
        k: f"method.neulite.{k}"
        for k in (
            "schedule",
            "stage_rounds",
            "stage_split",
            "mentor",
            "harmonizer",
            "lambda1",
            "lambda2",
            "lambda_scale",
            "sigma",
            "frozen_bn_drift",
            "inherit_outputs",
        )
    },
}
_OLD_KEY = re.compile(r"\bmethod\.(" + "|".join(sorted(_RENAMED, key=len, reverse=True)) + r")\b")


def spell(text: str) -> str:
    """Config overrides in today's spelling: `method.lambda_scale=1` -> `method.neulite.lambda_scale=1`."""
    return _OLD_KEY.sub(lambda m: _RENAMED[m.group(1)], text)


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def machine(m: dict[str, Any] | str) -> str:
    if isinstance(m, str):
        return m
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}{gpu}" + (
        f"; {m['processes']}" if m.get("processes") else ""
    )


def pct(x: float) -> str:
    return f"{x:.1%}"


# --- the tables -----------------------------------------------------------------------------


def _memory_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in data["reports"]:
        balanced = r.get("blocks", "one per resolution stage") != "one per resolution stage"
        user = ":" in r["model"]  # module:function
        label = r["model"].split(":")[-1] + (" ({}x{} inputs)".format(*r["input_shape"][1:]) if user else "")
        recompute = r.get("recompute", False)
        rows.append(
            {
                "label": label + (f" ({r['blocks']})" if balanced else "") + (", recomputing" if recompute else ""),
                "model": r["model"],
                "batch": r["batch_size"],
                "balanced": balanced,
                "recompute": recompute,
                "report": r,
                "worst_est": r["worst_stage_fraction"],
                "worst_meas": max(s["measured_fraction_of_full"] for s in r["stages"]),
                "error": max(abs(s["estimate_error"]) for s in [r["full"], *r["stages"]]),
            }
        )
    return rows


def _measured_with(rows: list[dict[str, Any]]) -> str:
    """Each way of measuring the rows used, with the models it measured (results.json keeps older rows)."""
    models: dict[str, list[str]] = {}
    for r in rows:
        labels = models.setdefault(r["report"]["measured_with"], [])
        if r["label"] not in labels:
            labels.append(r["label"])
    if len(models) == 1:
        return next(iter(models))
    return "; ".join(f"{how} ({', '.join(labels)})" for how, labels in models.items())


def memory_table(data: dict[str, Any]) -> str:
    lines = [
        "| model | batch | full model | stages (est / meas) | worst stage | largest estimate error | step time, stages / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in _memory_rows(data):
        r = row["report"]
        stages = ", ".join(f"{s['estimated_bytes'] / MIB:.0f} / {s['measured_bytes'] / MIB:.0f}" for s in r["stages"])
        full_step = r["full"].get("step_seconds")
        steps = ", ".join(f"{s['step_seconds'] / full_step:.2f}" for s in r["stages"]) if full_step else "–"
        lines.append(
            f"| {row['label']} | {row['batch']} | {r['full']['estimated_bytes'] / MIB:.0f} / {r['full']['measured_bytes'] / MIB:.0f} "
            f"| {stages} | {row['worst_est']:.0%}, {row['worst_meas']:.0%} | {row['error']:.1%} | {steps} |"
        )
    return "\n".join(lines)


def methods_table(methods: dict[str, Any]) -> str:
    lines = [
        "| method | final accuracy (mean ± std) | best | validation accuracy | clients took part | peak client MiB | MiB up / down |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(methods.items(), key=lambda kv: (-kv[1]["final_accuracy_mean"], kv[0])):
        lines.append(
            f"| {name} | {pct(r['final_accuracy_mean'])} ± {pct(r['final_accuracy_std'])} | {pct(r['best_accuracy'])} "
            f"| {pct(r['validation_accuracy'])} | {r['participation']:.0%} | {r['peak_memory_bytes'] / MIB:.1f} | {r['bytes_up'] / MIB:.0f} / {r['bytes_down'] / MIB:.0f} |"
        )
    return "\n".join(lines)


def per_seed(methods: dict[str, Any]) -> str:
    return (
        "Final accuracy per seed: "
        + "; ".join(f"{m} {', '.join(pct(a) for a in r['final_accuracies'])}" for m, r in methods.items())
        + "."
    )


def time_to_target_table(methods: dict[str, Any]) -> str:
    lines = ["| method | rounds | simulator wall s | clients' critical path s |", "|---|---|---|---|"]
    for m, r in methods.items():
        if r.get("client_seconds_to_target") is None:
            lines.append(f"| {m} | - | - | - |")
        else:
            lines.append(
                f"| {m} | {r['rounds_to_target']:.0f} | {r['seconds_to_target']:.0f} | {r['client_seconds_to_target']:.1f} |"
            )
    return "\n".join(lines)


def speed_table(data: dict[str, Any]) -> str:
    columns = ["rounds_to_target", "seconds_to_target"]
    if any("client_seconds_to_target" in r for r in data["methods"].values()):  # recorded since the rounds report it
        columns.append("client_seconds_to_target")
    lines = ["| method | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    order = sorted(
        data["methods"].items(),
        key=lambda kv: (kv[1]["seconds_to_target"] is None, kv[1]["seconds_to_target"] or 0, kv[0]),
    )
    for name, r in order:
        lines.append(
            f"| {name} | "
            + " | ".join(
                "-" if r.get(c) is None else f"{r[c]:.0f}" if c.startswith("rounds") else f"{r[c]:.1f}" for c in columns
            )
            + " |"
        )
    return "\n".join(lines)


def speed_ratios(data: dict[str, Any]) -> dict[str, float]:
    """How many times sooner NeuLite reaches the target than ExclusiveFL, per clock."""
    n, e = data["methods"]["neulite"], data["methods"]["exclusivefl"]
    clocks = ("rounds_to_target", "seconds_to_target", "client_seconds_to_target")
    return {c: e[c] / n[c] for c in clocks if n.get(c) and e.get(c)}


def flower_tables(data: dict[str, Any]) -> str:
    wall, acc = data["wall_seconds"], data["final_accuracy"]
    lines = [
        "| engine | wall seconds | final accuracy |",
        "|---|---|---|",
        f"| in-process simulator (`neulite run`) | {wall['in_process']:.1f} | {pct(acc['in_process'][0])} |",
        f"| Flower simulation engine (`neulite run --engine flower`) | {wall['flower_simulation']:.1f} | {pct(acc['flower_simulation'][0])} |",
        "",
        "| round | stage | clients | KiB down | KiB up | whole model each way, KiB | down / whole | up / whole |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rounds"]:
        whole = r["whole_model_bytes_each_way"]
        lines.append(
            f"| {r['round']} | {r['stage']} | {r['participants']} | {r['bytes_down'] / 1024:.0f} | {r['bytes_up'] / 1024:.0f} | {whole / 1024:.0f} "
            f"| {r['bytes_down'] / whole:.0%} | {r['bytes_up'] / whole:.0%} |"
        )
    down, up, whole = flower_totals(data)
    lines.append(
        f"| all | | | {down / 1024:.0f} | {up / 1024:.0f} | {whole / 1024:.0f} | {down / whole:.0%} | {up / whole:.0%} |"
    )
    return "\n".join(lines)


def flower_totals(data: dict[str, Any]) -> tuple[int, int, int]:
    return tuple(sum(r[k] for r in data["rounds"]) for k in ("bytes_down", "bytes_up", "whole_model_bytes_each_way"))  # type: ignore[return-value]


def tune_table(data: dict[str, Any]) -> str:
    lines = [
        "| candidate | validation accuracy (median) | by seed | (test accuracy, not used to choose) |",
        "|---|---|---|---|",
    ]
    for r in data["runs"]:
        by_seed = ", ".join(pct(v) for v in r["validation_by_seed"])
        lines.append(
            f"| `{spell(r['candidate'])}` | {pct(r['validation_accuracy'])} | {by_seed} | {pct(r['test_accuracy'])} |"
        )
    return "\n".join(lines)


# --- the sections of benchmarks/README.md ---------------------------------------------------


def _setting(cfg: dict[str, Any]) -> str:
    d, mo, t, m, c = cfg["data"], cfg["model"], cfg["train"], cfg["method"], cfg["clients"]
    epochs = f"{t['local_epochs']} local epoch" + ("s" if t["local_epochs"] != 1 else "")
    budget = (
        f"budgets uniform in [{c['fractions'][0]}, {c['fractions'][1]}] x the full model's training peak"
        if c["budget"] == "fraction"
        else f"budgets `{c['budget']}`"
    )
    split = {"params": "in proportion to the blocks' parameter counts", "equal": "equally"}.get(
        m.get("stage_split", ""), f"by `{m.get('stage_split')}`"
    )
    if m.get("stage_rounds"):
        split = f"as {m['stage_rounds']}"
    return (
        f"{d['name']}, {d['num_clients']} clients, {c['per_round']} a round, `{mo['name']}` at width {mo['width']}, "
        f"{m['rounds']} rounds of {epochs} at learning rate {t['lr']} (batch {t['batch_size']}), {budget}. "
        f"NeuLite's rounds are split over its stages {split}."
    )


def memory_section(data: dict[str, Any]) -> list[str]:
    rows = _memory_rows(data)
    out = [
        "## Memory: `python benchmarks/memory.py`",
        "",
        "Peak training memory of each NeuLite stage (Mentor and Harmonizer on) against training the whole",
        "model, for ResNet-18/34, VGG-16, MobileNetV2 and vit_tiny on 32x32 inputs and the two user CNNs of",
        "examples/user_cnns.py (one block per conv; `heavy_cnn` weight-heavy, `plain_cnn` VGG-like), 10",
        "classes, SGD with momentum. Each cell is *estimate / measurement* in MiB. The estimate is",
        "`neulite.memory`'s exact accounting; the measurement runs two real training steps in a fresh",
        'process. "Worst stage" is the largest stage as a share of full-model training (by the',
        "estimate, by the measurement). The rows marked *N memory-balanced* cut the same layers into N",
        "blocks of similar memory (`model.blocks = N`) instead of one block per resolution stage.",
        "",
        f"Machine: {machine(data['machine'])}. Measured with {_measured_with(rows)}.",
        "",
        memory_table(data),
        "",
    ]
    checked = [r for r in rows if "rss_check_bytes" in r["report"]["full"]]
    if checked:
        gap = max(
            abs(r["report"]["full"]["measured_bytes"] / r["report"]["full"]["rss_check_bytes"] - 1) for r in checked
        )
        out += [
            "benchmarks/rss_check.py, which reads a client's peak resident memory with code of its own, is within "
            f"{gap:.1%} of the measurement on the full models it checked ({', '.join(dict.fromkeys(r['label'] for r in checked))}).",
            "",
        ]
    by_key = {(r["model"], r["batch"], r["report"]["blocks"], r["recompute"]): r for r in rows}
    own = "one per resolution stage"
    plain, balanced = by_key.get(("resnet34", 64, own, False)), by_key.get(("resnet34", 64, "4 memory-balanced", False))
    if plain and balanced:
        out += [
            f"ResNet-34 at batch 64: the worst stage needs {plain['worst_est']:.0%} of full-model training by the estimate and "
            f"{plain['worst_meas']:.0%} by the measurement; cut into 4 memory-balanced blocks, {balanced['worst_est']:.0%} and "
            f"{balanced['worst_meas']:.0%}. Over every row the estimate is within {max(r['error'] for r in rows):.1%} of the measurement.",
            "",
        ]
    recomputing = [r for r in rows if r["recompute"] and r["batch"] == 64]
    if recomputing:
        out += [
            "With recomputation at batch 64, the worst stage measured: "
            + ", ".join(f"{r['label'].removesuffix(', recomputing')} {r['worst_meas']:.0%}" for r in recomputing)
            + ".",
            "",
        ]
    return out + recompute_cost(rows, "one thread") + at_budget_section(data)


def at_budget_section(data: dict[str, Any]) -> list[str]:
    """What train.recompute = "auto" gives a client whose budget is issue 13's target, per stage."""
    reports = data.get("at_budget", [])
    if not reports:
        return []
    lines = [
        'With `train.recompute = "auto"` a client pays only for the recomputation its budget needs. For a client whose '
        "budget is issue 13's target share of full-model training (by the estimate), each stage's measured share and, "
        "where the stage recomputes, the time it adds to the step against the plain stage (batch 64, one thread):",
        "",
        "| configuration | budget | stages: measured share (time added) | worst stage measured | most time added |",
        "|---|---|---|---|---|",
    ]
    costs = []
    for row in _memory_rows({"reports": reports}):
        cells, added = [], []
        for s in row["report"]["stages"]:
            cell = f"{s['measured_fraction_of_full']:.0%}"
            if "plain_step_seconds" in s:
                added.append(time_added(s))
                cell += f" ({added[-1]:+.0%})"
            cells.append(cell)
        costs += added
        lines.append(
            f"| {row['label']} | {row['report']['budget_fraction']:.0%} | {', '.join(cells)} | {row['worst_meas']:.0%} "
            f"| {format(max(added), '+.0%') if added else '–'} |"
        )
    over = sum(c > RECOMPUTE_TIME_TARGET for c in costs)
    return [
        *lines,
        "",
        f"{len(costs)} of {sum(len(r['stages']) for r in reports)} stages recompute at these budgets; "
        f"{over} add more than {RECOMPUTE_TIME_TARGET:.0%} to the step.",
        "",
    ]


def time_added(stage: dict[str, Any]) -> float:
    """What recomputation adds to a recomputing stage row's step, against the same stage without it."""
    return stage["step_seconds"] / stage["plain_step_seconds"] - 1


def recompute_cost(rows: list[dict[str, Any]], clock: str) -> list[str]:
    """A sentence on recomputation's time per step over every recomputing stage of `rows`, if any."""
    costs = [
        (r["label"], s["stage"], time_added(s))
        for r in rows
        if r["recompute"]
        for s in r["report"]["stages"]
        if "plain_step_seconds" in s
    ]
    if not costs:
        return []
    label, stage, worst = max(costs, key=lambda c: c[2])
    median = sorted(c[2] for c in costs)[len(costs) // 2]
    return [
        f"Recomputation's time per step, against the same stage without it ({clock}, median of 5 steps, "
        "the two stages' steps taken in turn so that the machine's drift cancels): "
        f"median {median:+.0%} over {len(costs)} stages, at most {worst:+.0%} ({label}, stage {stage}); "
        f"{sum(c[2] > RECOMPUTE_TIME_TARGET for c in costs)} above {RECOMPUTE_TIME_TARGET:+.0%} (issue 13's target).",
        "",
    ]


def _unrecomputed(rows: list[dict[str, Any]]) -> list[str]:
    """A sentence naming the configurations measured without recomputation but not yet with it."""
    done = {(r["label"].removesuffix(", recomputing"), r["batch"]) for r in rows if r["recompute"]}
    missing = [r["label"] for r in rows if not r["recompute"] and (r["label"], r["batch"]) not in done]
    if not missing:
        return []
    return [f"Not yet measured with recomputation: {', '.join(missing)} (the command above adds the missing rows)."]


def memory_cuda_section(data: dict[str, Any]) -> list[str]:
    rows = _memory_rows(data)
    cells = [(r["label"], s) for r in rows for s in [r["report"]["full"], *r["report"]["stages"]]]
    within = sum(abs(s["estimate_error"]) <= 0.10 for _, s in cells)
    label, worst = min(cells, key=lambda c: c[1]["estimate_error"])
    over = max(s["estimate_error"] for _, s in cells)
    return [
        "## Memory on a GPU: `python benchmarks/memory.py --device cuda --batch 64`",
        "",
        "The rows above at batch 64, measured on a GPU: the peak of `torch.cuda.max_memory_allocated` over two",
        "steps in a fresh process, after a twin client's warm-up step (cuBLAS's workspace and cuDNN's plans",
        "are a process's, as on the CPU). The estimate is the same accounting as above, made for the CPU's",
        "kernels. Step times are on the GPU; at these sizes its steps are bound by kernel launches, so",
        "they say little of the compute a stage saves.",
        *data.get("notes", []),
        *_unrecomputed(rows),
        "",
        f"Machine: {machine(data['machine'])}.",
        "",
        memory_table(data),
        "",
        f"The estimate is within 10% of the measurement on {within} of {len(cells)} rows; the furthest below is "
        f"{worst['estimate_error']:+.0%} ({label}, {'full model' if worst['stage'] == 0 else 'stage ' + str(worst['stage'])}), "
        f"the furthest above {over:+.0%}. The estimate does not model cuDNN's convolution workspaces, which a GPU client must "
        "budget on top of it.",
        "",
        *recompute_cost(rows, "on the GPU"),
    ]


def _headline(methods: dict[str, Any], key: str = "final_accuracy_mean") -> dict[str, Any]:
    baselines = {m: r for m, r in methods.items() if m not in ("fedavg", "exclusivefl") and not m.startswith("neulite")}
    best = max(sorted(baselines), key=lambda m: baselines[m][key], default=None)
    acc = {m: r[key] for m, r in methods.items()}
    return {
        "neulite": acc["neulite"],
        "exclusivefl": acc["exclusivefl"],
        "fedavg": acc["fedavg"],
        "best": best,
        "best_acc": acc.get(best),
    }


def _versus(a: float, b: float) -> str:
    d = (a - b) * 100
    return f"{abs(d):.1f} points {'above' if d > 0 else 'below' if d < 0 else 'level with'}"


def _headline_sentence(
    methods: dict[str, Any], key: str = "final_accuracy_mean", what: str = "Mean final accuracy"
) -> str:
    h = _headline(methods, key)
    ablations = ", ".join(f"{m} {pct(r[key])}" for m, r in sorted(methods.items()) if m.startswith("neulite-"))
    return (
        f"{what}: NeuLite {pct(h['neulite'])}, {_versus(h['neulite'], h['exclusivefl'])} ExclusiveFL ({pct(h['exclusivefl'])}), "
        + (
            f"{_versus(h['neulite'], h['best_acc'])} the best other memory-feasible baseline ({h['best']}, {pct(h['best_acc'])}) "
            if h["best"]
            else "(no other memory-feasible baseline run yet) "
        )
        + f"and {_versus(h['neulite'], h['fedavg'])} the FedAvg oracle, which ignores memory ({pct(h['fedavg'])})."
        + (f" NeuLite variants: {ablations}." if ablations else "")
    )


def _clocks_sentence(methods: dict[str, Any]) -> str | None:
    """Whose clocks the seconds to target are: they compare across methods only on one machine (None
    for a record from before methods named their machines)."""
    if any("hosts" not in r for r in methods.values()):
        return None
    timed = {m: r["hosts"] for m, r in methods.items() if r["critical_path_seconds_to_target"] is not None}
    if not timed:
        return None
    by_hosts: dict[tuple[str, ...], list[str]] = {}
    for m, hosts in timed.items():
        by_hosts.setdefault(tuple(hosts), []).append(m)
    parts = [
        f"{', '.join(ms)}: "
        + " and ".join("rounds that did not record it" if h == UNRECORDED_HOST else f"`{h}`" for h in hosts)
        for hosts, ms in by_hosts.items()
    ]
    every = {h for hosts in by_hosts for h in hosts}
    verdict = (
        "not all recorded" if UNRECORDED_HOST in every else "one machine" if len(every) == 1 else "several machines"
    )
    return f"Machines whose clocks the seconds to target are ({verdict}): {'; '.join(parts)}."


def accuracy_section(data: dict[str, Any]) -> list[str]:
    cfg = data["config"]
    runs = (len(data["methods"]) + len(data["iid"]["methods"])) * len(data["seeds"])
    out = [
        "## Accuracy: `python benchmarks/accuracy.py`",
        "",
        "Every method of `neulite compare` on the same data, clients and memory budgets",
        "([accuracy.toml](accuracy.toml)), with Dirichlet label skew and with an IID split. Few clients",
        "can train the full model, so ExclusiveFL learns from a small slice of the data; FedAvg is the",
        "oracle that ignores memory. The learning rate and NeuLite's rounds per stage were chosen on the",
        "clients' validation splits (see [Tuning](#tuning-on-the-validation-splits)).",
        "",
        f"Setting: {_setting(cfg)} Dirichlet α = {cfg['data']['alpha']}; seeds {data['seeds']}; {runs} runs in {data['seconds']:.0f} s.",
        "",
        f"Machine: {machine(data['machine'])}.",
        "",
    ]
    out += _split_section(
        f"Dirichlet({cfg['data']['alpha']})", data["methods"], "accuracy-dirichlet.png", "Dirichlet split"
    )
    out += _split_section("IID", data["iid"]["methods"], "accuracy-iid.png", "IID split")
    return out


def _split_section(title: str, methods: dict[str, Any], plot: str, alt: str) -> list[str]:
    """One split's table, headline and (when committed) accuracy plot."""
    out = [f"### {title} split", "", methods_table(methods), "", _headline_sentence(methods), ""]
    if (RESULTS / plot).is_file():
        out += [f"![Accuracy by round, {alt}](results/{plot})", ""]
    return out


def compute_section(data: dict[str, Any]) -> list[str]:
    seeds = sorted({s for r in data["methods"].values() for s in r["seeds"]})
    return [
        "## Accuracy at the default compute: `python benchmarks/compute.py`",
        "",
        "The accuracy question at the compute the method is meant to have: `configs/default.toml` (the",
        "embedded default, full-width model, more rounds and local epochs than the accuracy benchmark),",
        "for the FedAvg oracle and every memory-feasible baseline, one run at a time on all cores. The",
        "NeuLite ablations stay in the accuracy benchmark.",
        "",
        f"Setting: {_setting(data['config'])} Dirichlet α = {data['config']['data']['alpha']}; seeds {seeds}.",
        "",
        f"Machine: {machine(data['machine'])}.",
        "",
        methods_table(data["methods"]),
        "",
        _headline_sentence(data["methods"]),
        "",
        per_seed(data["methods"]),
        "",
        f"Time to ExclusiveFL's final median accuracy ({pct(data['target_accuracy'])}), median over seeds. The simulator trains the",
        "sampled clients one after another; the clients' critical path sums each round's slowest client, which is",
        "what a federation whose clients train in parallel waits for:",
        "",
        time_to_target_table(data["methods"]),
        "",
    ]


def speed_section(data: dict[str, Any]) -> list[str]:
    o = data["overhead"]
    ratios = speed_ratios(data)
    out = [
        "## Speed: `python benchmarks/speed.py`",
        "",
        "Time for each method to reach ExclusiveFL's final accuracy on the Dirichlet split of the accuracy",
        "benchmark (its runs read back, not repeated), median over seeds, on three clocks: rounds; the",
        "simulator's wall time, which trains the sampled clients one after another and so measures the total",
        "client work; and the clients' critical path, the sum of each round's slowest client. A `-` means",
        "most seeds never reached the target. The second part times the simulator against a bare PyTorch",
        "loop doing the same local steps, alternating the two so that drift in the machine's speed hits",
        "both alike (`python benchmarks/speed.py --overhead-only` re-measures only this).",
        "",
        f"Machine: {machine(data['machine'])}. Target: ExclusiveFL's final accuracy, {pct(data['target_accuracy'])} (median over seeds).",
        "",
        speed_table(data),
        "",
    ]
    if ratios:
        out += [
            "NeuLite against ExclusiveFL (how many times sooner): "
            + ", ".join(f"{c.replace('_', ' ')} {v:.2f}x" for c, v in ratios.items())
            + ".",
            "",
        ]
    on = machine(o.get("machine", data["machine"]))
    out += [
        f"Simulator overhead ({', '.join(f'`{s}`' for s in o['setting'])}; {on}; median of {o['repeats']} alternating runs): "
        f"simulator {o['simulator_seconds']:.1f} s, bare PyTorch loop {o['bare_torch_seconds']:.1f} s, ratio {o['ratio']:.3f}.",
        "",
    ]
    return out


def flower_section(data: dict[str, Any]) -> list[str]:
    parity = data["parity"]
    down, up, whole = flower_totals(data)
    return [
        "## Flower: `python benchmarks/flower.py`",
        "",
        "The same small NeuLite experiment through the in-process simulator and through Flower's simulation",
        "engine (Ray, one supernode per client); wall time is the whole call as a user sees it, Ray start-up",
        "included. The bytes are the tensors sent, the same through either engine, against sending the",
        "whole model (with its scaffolding) both ways, as the paper's reference code does. Then the default",
        "experiment through both engines, for final-accuracy parity. Ray's workers train single-threaded",
        "while the in-process simulator uses every core, so the two differ by floating-point rounding; with",
        "equal thread counts they agree to the bit (`tests/test_flower_simulation.py`).",
        "",
        f"Machine: {machine(data['machine'])}. Setting: default config with {', '.join(f'`{s}`' for s in data['setting'])}; "
        f"wall time median of {data['repeats']}.",
        "",
        flower_tables(data),
        "",
        f"Over the run NeuLite sent {down / whole:.0%} of the whole model's bytes down and {up / whole:.0%} back up.",
        "",
        f"Parity on `{parity['setting']}`: final accuracy {pct(parity['final_accuracy']['in_process'])} in-process "
        f"({parity['wall_seconds']['in_process']:.0f} s) against {pct(parity['final_accuracy']['flower_simulation'])} on Flower "
        f"({parity['wall_seconds']['flower_simulation']:.0f} s); same clients and bytes every round: {'yes' if parity['same_sampling_and_bytes'] else 'no'}.",
        "",
    ]


def scale_section(data: dict[str, Any]) -> list[str]:
    out = [
        "## Scale: `python benchmarks/scale.py`",
        "",
        "NeuLite federations of growing size, 10 clients trained a round, through the in-process simulator",
        "and Flower's simulation engine (one supernode per client). Every client holds the same 6",
        "Fashion-MNIST samples whatever the federation's size, so a round trains the same amount and what",
        "grows with the number of clients is the framework's own cost (and the training set, held once:",
        "clients are index views into it). Seconds per round: the median over a run's rounds after the",
        "first; memory: the peak resident memory of the run's processes summed (PSS counts a page that",
        "Ray's processes share once); each figure is the median over the runs shown. Flower's simulation",
        "engine (flwr 1.42) polls every node's queue every 0.1 s, scanning every stored message for each",
        "node (`InMemoryLinkState.get_message_ins`): its rounds, the profiling query to every node and the",
        "final validation grow with the number of nodes, whatever neulite does.",
        "",
        f"Machine: {machine(data['machine'])}. Setting: {', '.join(f'`{s}`' for s in data['setting'])}.",
        "",
        "| engine | clients | training set (MiB) | seconds per round | first round (s) | peak RSS (MiB) | peak PSS (MiB) | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, title in (("inprocess", "in-process"), ("flower", "Flower simulation")):
        for n, r in sorted(data.get(engine, {}).items(), key=lambda item: int(item[0])):
            out.append(
                f"| {title} | {int(n):,} | {r['training_set_bytes'] / MIB:.0f} | {r['seconds_per_round']:.2f} | "
                f"{r['first_round_seconds']:.2f} | {r['max_rss_bytes'] / MIB:.0f} | {r['max_pss_bytes'] / MIB:.0f} | {r['runs']} |"
            )
    return out + [""]


def stage_compute_section(data: dict[str, Any]) -> list[str]:
    lines = [
        "## A client's compute per stage: `python benchmarks/stage_compute.py`",
        "",
        f"One client's round ({data['client_samples']} samples, 1 local epoch) on the headline benchmark's setting, "
        f"timed for every NeuLite stage against full-model training ({data['full_model_seconds']:.2f} s), median of "
        f"{data['repeats']}. The frozen-prefix cache keeps the output of the blocks a stage runs without autograd; "
        "the first round of a stage fills it, every later round of the stage finds it. Machine: "
        f"{machine(data['machine'])}.",
        "",
        "| stage | frozen blocks | no cache | filling the cache | cache filled | cache per client |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["stages"]:
        lines.append(
            f"| {r['stage']} | {r['frozen_blocks']} | {r['seconds_without_cache']:.2f} s ({r['share_of_full_without_cache']:.0%}) "
            f"| {r['seconds_filling_cache']:.2f} s ({r['share_of_full_filling_cache']:.0%}) "
            f"| {r['seconds_with_cache']:.2f} s ({r['share_of_full_with_cache']:.0%}) | {r['cache_bytes'] / MIB:.1f} MiB |"
        )
    return [*lines, ""]


def _has_late(methods: dict[str, Any]) -> bool:
    """Whether every method has `late_accuracy_mean` (runs summarised before it was recorded have none)."""
    return all("late_accuracy_mean" in r for r in methods.values())


def headline_table(methods: dict[str, Any]) -> str:
    late = _has_late(methods)
    lines = [
        "| method | final accuracy (mean ± std) | per seed "
        + (f"| last {LATE_EVALUATIONS} evaluations " if late else "")
        + "| clients took part | peak client MiB | rounds to target | critical path s to target | wall s to target |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if late else ""),
    ]

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for name, r in sorted(methods.items(), key=lambda kv: (-kv[1]["final_accuracy_mean"], kv[0])):
        lines.append(
            f"| {name} | {pct(r['final_accuracy_mean'])} ± {pct(r['final_accuracy_std'])} "
            f"| {', '.join(pct(a) for a in r['final_accuracies'])} "
            + (f"| {pct(r['late_accuracy_mean'])} " if late else "")
            + f"| {r['participation']:.0%} "
            f"| {r['peak_memory_bytes'] / MIB:.1f} | {num(r['rounds_to_target'], '.0f')} "
            f"| {num(r['critical_path_seconds_to_target'], '.1f')} | {num(r['wall_seconds_to_target'], '.0f')} |"
        )
    return "\n".join(lines)


VIT_COMMAND = (
    "python benchmarks/headline.py --name vit --set model.name=vit_tiny --set model.width=0.5 "
    "--methods fedavg,exclusivefl,neulite --splits dirichlet-0.5 --seeds 0"
)


def vit_section(data: dict[str, Any]) -> list[str]:
    """The headline setting with the built-in Vision Transformer instead of the CNN."""
    return headline_section(data, f"## Transformer: `{VIT_COMMAND}`", "vit")


ELASTIC_COMMAND = (
    "python benchmarks/headline.py --name elastic --methods exclusivefl,neulite,neulite-elastic,"
    "neulite-elastic-backward --seeds 0,1,2"
)


def elastic_section(data: dict[str, Any]) -> list[str]:
    """Elastic NeuLite, both ways, against the paper's stages on the headline setting."""
    return headline_section(data, f"## Elastic stages: `{ELASTIC_COMMAND}`", "elastic")


def headline_section(
    data: dict[str, Any], title: str = "## Headline: `python benchmarks/headline.py`", name: str = "headline"
) -> list[str]:
    cfg = data["config"]
    stage_epochs = cfg["method"].get("neulite", {}).get("stage_epochs")
    per_stage = f" (NeuLite's: {stage_epochs} by stage)" if stage_epochs else ""
    out = [
        title,
        "",
        f"The full Fashion-MNIST, {cfg['data']['num_clients']} clients, {cfg['clients']['per_round']} a round, "
        f"{cfg['method']['rounds']} rounds of {cfg['train']['local_epochs']} local epoch(s){per_stage} at learning rate "
        f"{cfg['train']['lr']}, `{cfg['model']['name']}` at width {cfg['model']['width']}; budgets uniform in "
        f"{cfg['clients']['fractions']} x full-model training. The target is "
        "ExclusiveFL's final accuracy (median over seeds); time to it is the median over seeds (a seed that never "
        "reached it counts as infinitely slow). Machine: " + machine(data["machine"]) + ".",
        "",
    ]
    for split, result in data["splits"].items():
        out += [
            f"### {split}",
            "",
            headline_table(result["methods"]),
            "",
            f"Target: {pct(result['target_accuracy'])}. Seeds: {result.get('seeds', data.get('seeds'))}."
            + (f" Setting: {', '.join(f'`{o}`' for o in result['overrides'])}." if "overrides" in result else ""),
            "",
        ]
        if clocks := _clocks_sentence(result["methods"]):
            out += [clocks, ""]
        if {"neulite", "exclusivefl", "fedavg"} < result["methods"].keys():
            out += [_headline_sentence(result["methods"]), ""]
            if _has_late(result["methods"]):
                what = f"Mean accuracy over each run's last {LATE_EVALUATIONS} evaluations (one round's is noisy)"
                out += [_headline_sentence(result["methods"], "late_accuracy_mean", what), ""]
        if (RESULTS / f"{name}-{split}.png").is_file():
            out += [f"![Accuracy by round, {split}](results/{name}-{split}.png)", ""]
    return out


def robustness_table(data: dict[str, Any]) -> str:
    rules = data["rules"]
    attacks = list(next(iter(rules.values()))["attacks"])
    out = ["| `server.aggregation` | clean | " + " | ".join(a.replace("-k", ", k=") for a in attacks) + " |"]
    out.append("|---|---:|" + "---:|" * len(attacks))
    for rule, r in rules.items():
        out.append(f"| {rule} | {pct(r['clean'])} | " + " | ".join(pct(r["attacks"][a]) for a in attacks) + " |")
    return "\n".join(out)


def robustness_section(data: dict[str, Any]) -> list[str]:
    return [
        "## Robustness: `python benchmarks/robustness.py`",
        "",
        "NeuLite on a small federation (10 clients, all training every round) in which the first k clients",
        "answer every round with an attack instead of their update: `nan` (every tensor NaN), `huge` (every",
        "tensor 1e30), `inflate` (the honest update claiming 10^12 examples) and `sign_flip` (the update",
        "reversed and tripled: finite, in range, plausible). Median final test accuracy over the seeds; a run",
        "that stopped counts as 0.",
        "",
        f"Machine: {machine(data['machine'])}. Setting: default config with "
        f"{', '.join(f'`{s}`' for s in data['federation'])}; seeds {', '.join(map(str, data['seeds']))}.",
        "",
        robustness_table(data),
        "",
    ]


def devices_section(data: dict[str, Any]) -> list[str]:
    rows = data["devices"]
    out = [
        "## Devices held to their budget: `python benchmarks/devices.py`",
        "",
        "Each device is a fresh process that loads its client's shard and trains the network one batch (its",
        f"runtime's baseline); then the OS holds it to its budget ({data['mechanism']}: "
        + (
            "a memory cgroup of its own, counting resident memory as a device's RAM does; an excess is killed)."
            if data["mechanism"].startswith("cgroup")
            else "a data limit, counting virtual memory: stricter than RAM)."
        ),
        "On the default experiment, for each NeuLite stage, the budget lies midway between the stage's",
        "estimated peak and full-model training's: the device reports what it sees (its limit less what it",
        'holds), trains its stage, and a device under the same limit tries full-model training. "needs" is',
        "the least budget that trained, bisected to 0.25 MiB.",
        "",
        f"Machine: {machine(data['machine'])}.",
        "",
        "| stage | budget (MiB) | reported | assigned on it | stage est. | stage needs | full est. | full needs | stage trained | full failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in sorted({r["stage"] for r in rows}):
        runs = [r for r in rows if r["stage"] == stage]
        r = runs[0]
        reported = [x["reported_budget_mib"] for x in runs if x["reported_budget_mib"] is not None]
        assigned = sum(bool(x["assigned_on_report"]) for x in runs)
        trained = sum(x["stage_outcome"] == "trained" for x in runs)
        failed = sum(x["full_outcome"].startswith("failed") for x in runs)
        out.append(
            f"| {stage} | {r['budget_mib']:.1f} | {min(reported):.1f} | {assigned} of {len(runs)} |"
            if reported
            else f"| {stage} | {r['budget_mib']:.1f} | - | - |"
        )
        out[-1] += (
            f" {r['stage_peak_mib']:.1f} | {r['stage_needs_mib'] or '-'} | {r['full_peak_mib']:.1f} |"
            f" {r['full_needs_mib'] or '-'} | {trained} of {len(runs)} | {failed} of {len(runs)} |"
        )
    out += [
        "",
        "One round with `clients.enforce_budgets = true` (every sampled client trained as such a device) on",
        "the default budgets:",
        "",
        "| method | stage | stage est. (MiB) | sampled | trained | failed | budgets below the estimate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in data["rounds"].items():
        out.append(
            f"| {method} | {r['stage']} | {r['stage_peak_mib']:.1f} | {r['sampled']} | {r['trained']} | {r['failed']} |"
            f" {r['budgets_below_peak']} of {len(r['budgets_mib'])} |"
        )
    return out + [""]


SWEEPS = {
    "lr": "The local learning rate of the accuracy benchmark, chosen on the FedAvg oracle so that the choice favours no memory-efficient method; every method then shares it.",
    "schedule": "NeuLite's rounds per stage on the accuracy benchmark, at the chosen learning rate (applies to every `neulite*` variant).",
    "lambda": "The Mentor's λ scale (`method.neulite.lambda_scale`, which multiplies both curricula) on the embedded default.",
    "inherit": "Whether a new stage starts from the previous output module (`method.neulite.inherit_outputs`) on the accuracy benchmark.",
    "headline-lr": "The local learning rate of the headline benchmark, chosen on the FedAvg oracle as `lr` is; every method shares it.",
    "headline-schedule": "NeuLite's rounds per stage on the headline benchmark, at its chosen learning rate.",
    "headline-stage": "Elastic NeuLite's local epochs and learning rate per stage on the headline benchmark (issue 12's fourth lever): an early stage trains a small block, so more epochs there cost little.",
    "headline-epochs": "The local epochs of every method on the headline benchmark, chosen on the FedAvg oracle as the learning rate is: NeuLite's epochs per stage were tuned, so the baselines' are too (NeuLite's per-stage setting overrides it).",
}


def tune_paths() -> list[Path]:
    """The committed sweeps, in SWEEPS' order (lr and schedule set up the accuracy benchmark), then any others by name."""
    order = {name: i for i, name in enumerate(SWEEPS)}
    return sorted(
        RESULTS.glob("tune-*.json"), key=lambda p: (order.get(p.stem.removeprefix("tune-"), len(order)), p.name)
    )


def tune_section(paths: list[Path]) -> list[str]:
    out = [
        "## Tuning on the validation splits",
        "",
        "`python benchmarks/tune.py NAME`. Every setting chosen for a benchmark was",
        "chosen on the union of the clients' validation splits, never on the test set: each sweep runs one",
        "method over candidate overrides and seeds and picks the best median validation accuracy; the test",
        "accuracy is recorded for information only. Config keys are shown in today's spelling (the JSON keeps",
        "the spelling the sweep ran with).",
        "",
    ]
    for path in paths:
        data = json.loads(path.read_text())
        sweep = data.get("sweep", path.stem.removeprefix("tune-"))
        fixed = " ".join(f"`{spell(f)}`" for f in data["fixed"])
        out += [
            f"### `{sweep}`",
            "",
            f"{SWEEPS.get(sweep, '').strip()} Method `{data['method']}` on `{data['config']}`{' with ' + fixed if fixed else ''}, "
            f"seeds {data['seeds']}; picked: `{spell(data['chosen'])}`. Machine: {machine(data['machine'])}.",
            "",
            tune_table(data),
            "",
        ]
        if sweep == "lambda":
            out += _lambda_note(data)
    return out


def _lambda_note(data: dict[str, Any]) -> list[str]:
    acc, compute = load("accuracy"), load("compute")
    if not acc or not compute:
        return []
    splits = [acc["methods"], acc["iid"]["methods"]]
    on = sum(s["neulite"]["validation_accuracy"] for s in splits) / len(splits)
    off = sum(s["neulite-no-mentor"]["validation_accuracy"] for s in splits) / len(splits)
    val_n = "one seed" if len(data["seeds"]) == 1 else f"{len(data['seeds'])} seeds"
    return [
        f"This sweep is {val_n} on a model near saturation, where the candidates differ by a few validation samples, so it does "
        f"not decide. On the accuracy benchmark, where the model is far from saturated, NeuLite's validation accuracy averaged over "
        f"the two splits is {pct(on)} with the Mentor at scale {acc['config']['method']['lambda_scale']} against {pct(off)} "
        f"without it (`neulite-no-mentor`), so the default stays at `method.neulite.lambda_scale = {compute['config']['method']['lambda_scale']}`.",
        "",
    ]


INTRO = [
    "# Benchmarks",
    "",
    "<!-- Written by `python benchmarks/report.py` from results/*.json: edit report.py, not this file. -->",
    "",
    "Every figure on this page is rendered by [report.py](report.py) from the JSON that the benchmark",
    "scripts wrote and that is committed in [results/](results). To redo a benchmark, run its script (it",
    "rewrites its JSON; the long ones keep per-run folders in `results/*-runs/` and resume after an",
    "interruption), then `python benchmarks/report.py` to rewrite this page and the summary in the",
    "top-level README. `python benchmarks/report.py --check`, and `tests/test_benchmarks_readme.py`, fail",
    "when this page no longer matches the JSON. All runs are on CPU but memory-cuda.json's, on a GPU.",
    "",
]


def index(available: dict[str, dict[str, Any] | None], tunes: list[Path]) -> list[str]:
    rows = [
        (
            "headline",
            "`python benchmarks/headline.py`",
            "every memory-feasible method on the full Fashion-MNIST, 100 clients, Dirichlet 0.1 / 0.5 and IID",
        ),
        (
            "memory",
            "`python benchmarks/memory.py`",
            "per-stage peak training memory against the whole model, estimated and measured",
        ),
        (
            "memory-cuda",
            "`python benchmarks/memory.py --device cuda --batch 64`",
            "the same on a GPU: allocated bytes and step times",
        ),
        (
            "accuracy",
            "`python benchmarks/accuracy.py`",
            "final accuracy of every method under memory heterogeneity, Dirichlet and IID, 3 seeds",
        ),
        ("compute", "`python benchmarks/compute.py`", "the same question at the embedded default's compute"),
        ("speed", "`python benchmarks/speed.py`", "time to ExclusiveFL's final accuracy; the simulator's overhead"),
        (
            "stage-compute",
            "`python benchmarks/stage_compute.py`",
            "a client's compute per stage against full-model training, with and without the prefix cache",
        ),
        (
            "flower",
            "`python benchmarks/flower.py`",
            "in-process simulator against Flower's engine: time, accuracy, bytes",
        ),
        (
            "robustness",
            "`python benchmarks/robustness.py`",
            "final accuracy with 1 or 2 hostile clients of 10, under each aggregation rule",
        ),
        (
            "elastic",
            f"`{ELASTIC_COMMAND}`",
            "elastic NeuLite (forward and backward windows) against NeuLite and ExclusiveFL, 3 seeds",
        ),
        (
            "vit",
            f"`{VIT_COMMAND}`",
            "the headline setting with the built-in Vision Transformer: NeuLite against ExclusiveFL and FedAvg",
        ),
        (
            "scale",
            "`python benchmarks/scale.py`",
            "seconds per round and peak memory for 100 to 10,000 clients, in-process and on Flower",
        ),
        (
            "devices",
            "`python benchmarks/devices.py`",
            "training on a device held to its budget by the OS: a stage against the full model",
        ),
    ]
    out = ["| command | measures | results | machine |", "|---|---|---|---|"]
    for name, command, what in rows:
        if available.get(name):
            out.append(
                f"| {command} | {what} | [{name}.json](results/{name}.json) | {machine(available[name]['machine'])} |"
            )
    for path in tunes:
        data = json.loads(path.read_text())
        out.append(
            f"| `python benchmarks/tune.py {data['sweep']}` | a setting chosen on validation splits | "
            f"[{path.name}](results/{path.name}) | {machine(data['machine'])} |"
        )
    return out + [""]


def render_benchmarks() -> str:
    """The whole text of benchmarks/README.md."""
    names = (
        "headline",
        "memory",
        "memory-cuda",
        "accuracy",
        "compute",
        "speed",
        "stage-compute",
        "flower",
        "robustness",
        "devices",
        "scale",
        "vit",
        "elastic",
    )
    data = {name: load(name) for name in names}
    tunes = tune_paths()
    out = INTRO + index(data, tunes)
    for name, section in (
        ("headline", headline_section),
        ("memory", memory_section),
        ("memory-cuda", memory_cuda_section),
        ("accuracy", accuracy_section),
        ("compute", compute_section),
        ("speed", speed_section),
        ("stage-compute", stage_compute_section),
        ("flower", flower_section),
        ("robustness", robustness_section),
        ("devices", devices_section),
        ("scale", scale_section),
        ("vit", vit_section),
        ("elastic", elastic_section),
    ):
        if data[name]:
            out += section(data[name])
    if tunes:
        out += tune_section(tunes)
    return "\n".join(out).rstrip("\n") + "\n"


# --- the summary in README.md ---------------------------------------------------------------


def render_summary() -> str:
    """The headline figures for README.md's results section (between SUMMARY_BEGIN and SUMMARY_END)."""
    out: list[str] = []
    if head := load("headline"):
        parts = []
        for split, result in head["splits"].items():
            m = result["methods"]
            if {"neulite", "exclusivefl", "fedavg"} < m.keys():
                h = _headline(m)
                elastic = (
                    f" (elastic {pct(m['neulite-elastic']['final_accuracy_mean'])})" if "neulite-elastic" in m else ""
                )
                parts.append(
                    f"{split} ({len(result['seeds'])} seed{'s' * (len(result['seeds']) > 1)}): NeuLite {pct(h['neulite'])}{elastic}, ExclusiveFL "
                    f"{pct(h['exclusivefl'])}, "
                    + (f"{h['best']} {pct(h['best_acc'])}, " if h["best"] else "")
                    + f"FedAvg {pct(h['fedavg'])}"
                )
        if parts:
            out.append(
                "- **Headline** (`python benchmarks/headline.py`, full Fashion-MNIST, 100 clients): "
                + "; ".join(parts)
                + " (NeuLite, ExclusiveFL, the best other memory-feasible baseline, the FedAvg oracle)."
            )
    if mem := load("memory"):
        resnet34 = [r for r in _memory_rows(mem) if r["model"] == "resnet34" and r["batch"] == 64]
        if resnet34:
            best = min(resnet34, key=lambda r: r["worst_meas"])
            cut = f"`model.blocks = {best['report']['blocks'].split()[0]}`" if best["balanced"] else "its own blocks"
            out.append(
                f"- **Memory** (`python benchmarks/memory.py`): training ResNet-34 at batch 64 one stage at a time needs at most "
                f"{best['worst_meas']:.0%} of full-model training memory (measured; {cut}"
                f"{', recomputing' if best['recompute'] else ''}). The estimate that decides eligibility is within "
                f"{max(r['error'] for r in _memory_rows(mem)):.1%} of the measurement."
            )
    if acc := load("accuracy"):
        d, i = _headline(acc["methods"]), _headline(acc["iid"]["methods"])
        out.append(
            f"- **Accuracy under memory heterogeneity** (`python benchmarks/accuracy.py`, {len(acc['seeds'])} seeds, "
            f"Dirichlet({acc['config']['data']['alpha']})): NeuLite {pct(d['neulite'])} against ExclusiveFL {pct(d['exclusivefl'])}, "
            f"the best other memory-feasible baseline ({d['best']}) {pct(d['best_acc'])} and the FedAvg oracle, which ignores memory, "
            f"{pct(d['fedavg'])}. On the IID split: NeuLite {pct(i['neulite'])}, ExclusiveFL {pct(i['exclusivefl'])}, "
            f"{i['best']} {pct(i['best_acc'])}, FedAvg {pct(i['fedavg'])}."
        )
    if comp := load("compute"):
        m = comp["methods"]
        h = _headline(m)
        out.append(
            f"- **At the default's compute** (`python benchmarks/compute.py`): NeuLite {pct(m['neulite']['final_accuracy_mean'])} "
            f"± {pct(m['neulite']['final_accuracy_std'])}, ExclusiveFL {pct(m['exclusivefl']['final_accuracy_mean'])} "
            f"± {pct(m['exclusivefl']['final_accuracy_std'])}, the best other memory-feasible baseline ({h['best']}) {pct(h['best_acc'])}, "
            f"FedAvg {pct(h['fedavg'])} ({len(m['neulite']['seeds'])} seeds)."
        )
    if (speed := load("speed")) and (r := speed_ratios(speed)):
        clocks = {
            "rounds_to_target": "in rounds",
            "client_seconds_to_target": "on the clients' critical path",
            "seconds_to_target": "in simulator time (the simulator runs the clients one after another)",
        }
        parts = [f"{r[c]:.2f}x sooner {words}" for c, words in clocks.items() if c in r]
        out.append(
            f"- **Speed** (`python benchmarks/speed.py`): NeuLite reaches ExclusiveFL's final accuracy {', '.join(parts[:-1])} and {parts[-1]}."
            if len(parts) > 1
            else f"- **Speed** (`python benchmarks/speed.py`): NeuLite reaches ExclusiveFL's final accuracy {parts[0]}."
        )
    if fl := load("flower"):
        p = fl["parity"]
        down, up, whole = flower_totals(fl)
        out.append(
            f"- **Flower** (`python benchmarks/flower.py`): the default experiment ends at {pct(p['final_accuracy']['in_process'])} "
            f"in-process and {pct(p['final_accuracy']['flower_simulation'])} on Flower's engine, with the same clients and bytes every "
            f"round; clients receive {down / whole:.0%} and return {up / whole:.0%} of the whole model's bytes."
        )
    if rob := load("robustness"):
        rules = rob["rules"]
        flip = {rule: r["attacks"]["sign_flip-k2"] for rule, r in rules.items()}
        drop = max(
            0.0,
            *(
                r["clean"] - r["attacks"][f"{a}-k{k}"]
                for r in rules.values()
                for a in ("nan", "huge", "inflate")
                for k in (1, 2)
            ),
        )
        out.append(
            f"- **Robustness** (`python benchmarks/robustness.py`, 2 hostile clients of 10): NaN, 1e30 and inflated-count "
            f"replies are refused under every rule (at most {drop * 100:.1f} points lost); against a sign-flipping pair: "
            f"`mean` {pct(flip['mean'])}, `trimmed_mean` {pct(flip['trimmed_mean'])}, `median` {pct(flip['median'])} "
            f"(clean: {pct(rules['mean']['clean'])}, {pct(rules['trimmed_mean']['clean'])}, {pct(rules['median']['clean'])})."
        )
    if scale := load("scale"):
        parts = []
        for engine, title in (("inprocess", "in-process"), ("flower", "on Flower's simulation engine")):
            rows = sorted(scale.get(engine, {}).items(), key=lambda item: int(item[0]))
            if len(rows) > 1:
                (n0, a), (n1, b) = rows[0], rows[-1]
                parts.append(
                    f"{title}, {int(n0):,} to {int(n1):,} clients: {a['seconds_per_round']:.2f} to "
                    f"{b['seconds_per_round']:.2f} s a round, peak memory {a['max_rss_bytes'] / MIB:.0f} to "
                    f"{b['max_rss_bytes'] / MIB:.0f} MiB"
                )
        if parts:
            out.append(
                "- **Scale** (`python benchmarks/scale.py`, 10 clients a round, the same data per client): "
                + "; ".join(parts)
                + "."
            )
    return "\n".join(out) + "\n"


def splice(readme: str, summary: str) -> str:
    """README text with the block between the markers replaced by `summary`."""
    begin, end = readme.find(SUMMARY_BEGIN), readme.find(SUMMARY_END)
    if begin < 0 or end < begin:
        raise SystemExit(
            f"{TOP_README}: the results summary markers are missing; put\n{SUMMARY_BEGIN}\n{SUMMARY_END}\nwhere the summary goes"
        )
    return readme[: begin + len(SUMMARY_BEGIN)] + "\n" + summary + readme[end:]


def expected() -> dict[Path, str]:
    """Each generated file's path and the text it should hold."""
    return {BENCH_README: render_benchmarks(), TOP_README: splice(TOP_README.read_text(), render_summary())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    want = expected()
    stale = [path for path, text in want.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} is out of date with benchmarks/results/*.json: run python benchmarks/report.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.write_text(want[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
