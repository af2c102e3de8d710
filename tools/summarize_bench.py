"""Markdown tables from the JSON lines that the benchmark scripts wrote into a folder.

    python tools/summarize_bench.py bench_out > bench_out/summary.md
"""
from __future__ import annotations

import json
import os
import sys

COLUMNS = {
    "bench_step.jsonl": ("arch", "batch_size", "precision", "channels_last", "compile",
                         "loss_impl", "samples_per_s", "step_ms", "peak_mem_gib",
                         "gflop_per_sample", "mfu", "error"),
}


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def table(rows: list[dict], columns: tuple[str, ...] | None) -> str:
    columns = columns or tuple(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main(folder: str) -> None:
    for name in ("env.txt", "stages.txt"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            print(f"## {name}\n```\n{open(path).read().strip()}\n```\n")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            rows = read_jsonl(os.path.join(folder, name))
            if rows:
                print(f"## {name}\n{table(rows, COLUMNS.get(name))}\n")
    step_path = os.path.join(folder, "bench_step.jsonl")
    step_rows = [r for r in read_jsonl(step_path) if "samples_per_s" in r] if os.path.isfile(
        step_path) else []
    if step_rows:
        best = max(step_rows, key=lambda r: r["samples_per_s"])
        images = 100 * 1_281_167  # 100 epochs of IN1K train
        print("## projection (compute only, synthetic data, best row above, linear scaling)")
        for n in (1, 8):
            hours = images / (best["samples_per_s"] * n) / 3600
            print(f"- {n} x {best['device_name']}: {hours:.1f} h for 100 t-ReX epochs")
    stage_path = os.path.join(folder, "bench_gpu_stage.jsonl")
    for stage in read_jsonl(stage_path) if os.path.isfile(stage_path) else []:
        same = [r for r in step_rows if r["batch_size"] == stage["batch_size"]]
        if same:
            step_ms = min(r["step_ms"] for r in same)
            what = ("nvJPEG decode + GPU multi-crop stage" if stage.get("decode") == "gpu"
                    else "GPU multi-crop stage")
            print(f"- {what} at batch {stage['batch_size']}: "
                  f"{stage['ms_per_batch']} ms = {100 * stage['ms_per_batch'] / step_ms:.1f}% of "
                  f"the fastest training step ({step_ms} ms)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out")
