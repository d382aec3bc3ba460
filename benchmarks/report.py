"""Render the benchmark JSON files as the Markdown tables the README shows.

Run: python benchmarks/report.py   (reads benchmarks/results/{memory,accuracy,compute,speed,flower,tune-*}.json)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB = 2**20


def memory() -> str:
    data = json.loads((RESULTS / "memory.json").read_text())
    lines = [
        f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch {data['machine']['torch']}. "
        "Estimate / measurement in MiB; worst stage as a share of full-model training (estimate, measurement).",
        "",
        "| model | batch | full model | stages (est / meas) | worst stage | largest estimate error |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["reports"]:
        stages = ", ".join(f"{s['estimated_bytes'] / MIB:.0f} / {s['measured_bytes'] / MIB:.0f}" for s in r["stages"])
        meas_worst = max(s["measured_fraction_of_full"] for s in r["stages"])
        err = max(abs(s["estimate_error"]) for s in [r["full"], *r["stages"]])
        blocks = "" if r.get("blocks", "one per resolution stage") == "one per resolution stage" else f" ({r['blocks']})"
        lines.append(
            f"| {r['model']}{blocks} | {r['batch_size']} | {r['full']['estimated_bytes'] / MIB:.0f} / {r['full']['measured_bytes'] / MIB:.0f} "
            f"| {stages} | {r['worst_stage_fraction']:.0%}, {meas_worst:.0%} | {err:.1%} |"
        )
    return "\n".join(lines)


def _methods_table(methods: dict) -> list[str]:
    lines = [
        "| method | final accuracy (mean ± std) | best | validation accuracy | clients took part | peak client MiB | MiB up / down |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(methods.items(), key=lambda kv: -kv[1]["final_accuracy_mean"]):
        lines.append(
            f"| {name} | {r['final_accuracy_mean']:.1%} ± {r['final_accuracy_std']:.1%} | {r['best_accuracy']:.1%} "
            f"| {r['validation_accuracy']:.1%} | {r['participation']:.0%} | {r['peak_memory_bytes'] / MIB:.1f} | {r['bytes_up'] / MIB:.0f} / {r['bytes_down'] / MIB:.0f} |"
        )
    return lines


def accuracy() -> str:
    data = json.loads((RESULTS / "accuracy.json").read_text())
    out = [f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores ({data['machine'].get('processes', '')}); seeds {data['seeds']}."]
    out += ["", "Dirichlet(0.5) split:", ""]
    out += _methods_table(data["methods"])
    out += ["", "IID split:", ""]
    out += _methods_table(data["iid"]["methods"])
    return "\n".join(out)


def compute() -> str:
    data = json.loads((RESULTS / "compute.json").read_text())
    seeds = sorted({s for r in data["methods"].values() for s in r["seeds"]})
    out = [f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores; seeds {seeds}.", ""]
    out += _methods_table(data["methods"])
    out += ["", "Per seed: " + "; ".join(f"{m} {', '.join(f'{a:.1%}' for a in r['final_accuracies'])}" for m, r in data["methods"].items())]
    timed = {m: r for m, r in data["methods"].items() if r.get("client_seconds_to_target") is not None}
    if timed:
        out += [
            "", f"Time to ExclusiveFL's final median accuracy ({data['target_accuracy']:.1%}), median over seeds; the clients' critical path sums each round's slowest client, as if the clients trained in parallel:", "",
            "| method | rounds | simulator wall s | clients' critical path s |", "|---|---|---|---|",
        ]
        out += [f"| {m} | {r['rounds_to_target']:.0f} | {r['seconds_to_target']:.0f} | {r['client_seconds_to_target']:.1f} |" for m, r in timed.items()]
    return "\n".join(out)


def speed() -> str:
    data = json.loads((RESULTS / "speed.json").read_text())
    lines = [
        f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores. Target: ExclusiveFL's final accuracy, {data['target_accuracy']:.1%} (Dirichlet split of the accuracy benchmark, median over seeds).",
        "",
    ]
    columns = ["rounds_to_target", "seconds_to_target"]
    if any("client_seconds_to_target" in r for r in data["methods"].values()):  # recorded since the rounds report it
        columns.append("client_seconds_to_target")
    lines += ["| method | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in sorted(data["methods"].items(), key=lambda kv: (kv[1]["seconds_to_target"] is None, kv[1]["seconds_to_target"] or 0)):
        lines.append(f"| {name} | " + " | ".join("-" if r.get(c) is None else f"{r[c]:.0f}" if c.startswith("rounds") else f"{r[c]:.1f}" for c in columns) + " |")
    neulite, exclusive = data["methods"]["neulite"], data["methods"]["exclusivefl"]
    if neulite["seconds_to_target"]:
        ratios = ", ".join(f"{c.replace('_', ' ')} {exclusive[c] / neulite[c]:.2f}x" for c in columns if neulite.get(c) and exclusive.get(c))
        lines += ["", f"NeuLite against ExclusiveFL (how many times sooner): {ratios}."]
    o = data["overhead"]
    on = o.get("machine", data["machine"])["cpu"]
    lines += ["", f"Simulator overhead ({', '.join(o['setting'])}, {on}, alternating runs, median of {o['repeats']}): simulator {o['simulator_seconds']:.1f} s, bare PyTorch loop {o['bare_torch_seconds']:.1f} s, ratio {o['ratio']:.3f}."]
    return "\n".join(lines)


def flower() -> str:
    data = json.loads((RESULTS / "flower.json").read_text())
    wall, acc, parity = data["wall_seconds"], data["final_accuracy"], data["parity"]
    lines = [
        f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores. Setting: default config with {', '.join(data['setting'])}; "
        f"wall time of the whole call, median of {data['repeats']}.",
        "",
        "| engine | wall seconds | final accuracy |",
        "|---|---|---|",
        f"| in-process simulator (`neulite run`) | {wall['in_process']:.1f} | {acc['in_process'][0]:.1%} |",
        f"| Flower simulation engine (`neulite run --engine flower`) | {wall['flower_simulation']:.1f} | {acc['flower_simulation'][0]:.1%} |",
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
    down, up, whole = (sum(r[k] for r in data["rounds"]) for k in ("bytes_down", "bytes_up", "whole_model_bytes_each_way"))
    lines += [
        f"| all | | | {down / 1024:.0f} | {up / 1024:.0f} | {whole / 1024:.0f} | {down / whole:.0%} | {up / whole:.0%} |",
        "",
        f"Parity on {parity['setting']} (45 rounds, 20 clients): final accuracy {parity['final_accuracy']['in_process']:.1%} in-process "
        f"({parity['wall_seconds']['in_process']:.0f} s) against {parity['final_accuracy']['flower_simulation']:.1%} on Flower "
        f"({parity['wall_seconds']['flower_simulation']:.0f} s); same clients and bytes every round: {parity['same_sampling_and_bytes']}.",
    ]
    return "\n".join(lines)


def tune(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [
        f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores. {data['method']} on {data['config']} "
        f"{' '.join(data['fixed'])}, seeds {data['seeds']}; chosen: {data['chosen']}.",
        "",
        "| candidate | validation accuracy (median) | by seed | (test accuracy, not used to choose) |",
        "|---|---|---|---|",
    ]
    for r in data["runs"]:
        by_seed = ", ".join(f"{v:.1%}" for v in r["validation_by_seed"])
        lines.append(f"| `{r['candidate']}` | {r['validation_accuracy']:.1%} | {by_seed} | {r['test_accuracy']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    for name, render in (("memory", memory), ("accuracy", accuracy), ("compute", compute), ("speed", speed), ("flower", flower)):
        if (RESULTS / f"{name}.json").is_file():
            print(f"### {name}\n\n{render()}\n")
    for path in sorted(RESULTS.glob("tune-*.json")):
        print(f"### {path.stem}\n\n{tune(path)}\n")


if __name__ == "__main__":
    main()
