"""summary.md of a tools/gpu_check.sh run, or of any folder of benchmark JSON lines.

    python tools/summarize_bench.py FOLDER > FOLDER/summary.md

FOLDER holds <stage>.jsonl (the JSON lines each stage printed) and, from gpu_check.sh, env.txt,
plan.txt ("stage limit" per line) and stages.txt ("stage exit_code seconds limit [note]").
Sections: the stages and their own exit codes; the training step (samples/s, MFU) per
configuration; the multi-crop stage and its share of a step at the same batch size; the fused
loss kernel; any other JSON lines; the projected time of 100 epochs on 1 and 8 GPUs (step plus
stage). Standard library only: gpu_check.sh runs it after every stage, on a machine where
nothing else may be working.
"""
from __future__ import annotations

import json
import os
import sys

IN1K_TRAIN_IMAGES = 1_281_167
EPOCHS = 100  # the projection's length (RECIPE.md trains 100 epochs)
GPUS = (1, 8)


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """(rows, number of lines starting with '{' that are not valid JSON: a cut-off write)."""
    rows, broken = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                broken += 1
    return rows, broken


def read_stage_records(folder: str) -> tuple[list[tuple[str, str]], list[dict]]:
    """(plan [(stage, limit)], records [{stage, rc, seconds, limit, note}]) from the text files
    gpu_check.sh writes; empty where a file is absent."""
    def lines(name):
        path = os.path.join(folder, name)
        return open(path).read().splitlines() if os.path.isfile(path) else []

    plan = [tuple(line.split()[:2]) for line in lines("plan.txt") if line.strip()]
    records = []
    for line in lines("stages.txt"):
        parts = line.split(maxsplit=4)
        if len(parts) >= 4:
            records.append(dict(stage=parts[0], rc=parts[1], seconds=parts[2], limit=parts[3],
                                note=parts[4] if len(parts) > 4 else ""))
    return plan, records


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "" if v is None else str(v).replace("|", "/")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _num(v, digits: int = 1):
    return None if v is None else round(float(v), digits)


def kind_of(row: dict) -> str:
    if row.get("bench") == "step":
        return "step"
    if row.get("bench") == "gpu_stage":
        return "stage"
    if "impl" in row and "total_ms" in row:
        return "kernel"
    return "other"


def load_rows(folder: str) -> tuple[dict[str, list[dict]], list[str]]:
    """Rows by kind, each tagged with its stage (the file name); and notes on broken lines."""
    by_kind: dict[str, list[dict]] = {"step": [], "stage": [], "kernel": [], "other": []}
    notes = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        rows, broken = read_jsonl(os.path.join(folder, name))
        if broken:
            notes.append(f"{name}: {broken} cut-off JSON line(s) skipped")
        for row in rows:
            by_kind[kind_of(row)].append({"stage": name[:-len(".jsonl")], **row})
    return by_kind, notes


def fastest_steps(steps: list[dict]) -> dict[int, dict]:
    """The fastest successful step row per batch size."""
    best: dict[int, dict] = {}
    for r in steps:
        if "step_ms" in r and "error" not in r:
            b = r["batch_size"]
            if b not in best or r["step_ms"] < best[b]["step_ms"]:
                best[b] = r
    return best


def failed_rows(rows: list[dict]) -> list[dict]:
    """JSON lines that report a failed measurement: an "error", or a kernel record not "ok"."""
    return [r for r in rows if r.get("error") or r.get("status", "ok") != "ok"]


def stages_section(plan, records, stages_with_errors: set[str]) -> str:
    """A stage failed when its command's exit code is neither 0 nor skip, or when one of its
    JSON lines reports a failure (issue 22: older scripts exited 0 after an error record)."""
    rows, failed = [], []
    for r in records:
        json_failed = r["rc"] != "skip" and r["stage"] in stages_with_errors
        note = "; ".join(filter(None, [r["note"],
                                       "a JSON line reports a failure" if json_failed else ""]))
        if r["rc"] not in ("0", "skip") or json_failed:
            failed.append(r["stage"])
        rows.append([r["stage"], r["rc"], r["seconds"], r["limit"], note])
    done = {r["stage"] for r in records}
    rows += [[name, "-", "-", limit, "not reached"] for name, limit in plan if name not in done]
    verdict = (f"{len(failed)} failed: {', '.join(failed)}" if failed else "none failed")
    return (f"## Stages ({len(records)} of {len(plan) or len(records)} recorded, {verdict})\n"
            "Exit code of each stage's own command (124: its time limit).\n\n"
            + table(["stage", "exit", "s", "limit s", "note"], rows))


def step_section(steps: list[dict]) -> str:
    rows = [[r["stage"], r.get("arch"), r.get("batch_size"), r.get("precision"),
             r.get("compile"), r.get("loss_impl"), r.get("samples_per_s"), r.get("step_ms"),
             _num(100 * r["mfu"]) if r.get("mfu") is not None else None,
             r.get("matmul_tflops"), r.get("peak_mem_gib"), str(r.get("error", ""))[:120]]
            for r in steps]
    return ("## Training step (tools/bench_step.py, synthetic crops on the device)\n"
            "MFU: model FLOPs per second over the dense matmul rate measured in the same "
            "process.\n\n" + table(["stage", "arch", "batch", "precision", "compile", "loss",
                                    "samples/s", "step ms", "MFU %", "matmul TFLOP/s",
                                    "peak GiB", "error"], rows))


def stage_share(stage: dict, best: dict[int, dict]) -> tuple[float | None, dict | None]:
    step = best.get(stage.get("batch_size"))
    if step is None or stage.get("ms_per_batch") is None:
        return None, None
    return stage["ms_per_batch"] / step["step_ms"], step


def multicrop_section(stages: list[dict], best: dict[int, dict]) -> str:
    rows = []
    for r in stages:
        share, step = stage_share(r, best)
        rows.append([r["stage"], r.get("impl"), r.get("decode"), r.get("batch_size"),
                     r.get("crops"), r.get("ms_per_batch"), r.get("images_per_s"),
                     r.get("decode_ms_per_batch"),
                     None if share is None else f"{100 * share:.1f}% of {step['step_ms']} ms"])
    return ("## Multi-crop stage (tools/bench_gpu_stage.py)\n"
            "Share: the stage's ms per batch over the fastest training step at the same batch "
            "size (DESIGN.md's target: under 3%).\n\n"
            + table(["stage", "impl", "decode", "batch", "crops", "ms/batch", "images/s",
                     "decode ms", "share of step"], rows))


def kernel_section(kernels: list[dict]) -> str:
    rows = [[r.get("n"), r.get("c"), r.get("d"), r.get("dtype"), r.get("impl"), r.get("status"),
             _num(r.get("fwd_ms"), 3), _num(r.get("bwd_ms"), 3), _num(r.get("total_ms"), 3),
             _num(r.get("speedup_vs_torch"), 2), _num(r.get("peak_mem_mb")),
             _num(r.get("extra_mem_mb")), str(r.get("reason") or "")[:120]]
            for r in kernels]
    return ("## Fused prototype CE (tools/bench_kernel.py)\n\n"
            + table(["N", "C", "D", "dtype", "impl", "status", "fwd ms", "bwd ms", "total ms",
                     "x torch", "peak MiB", "extra MiB", "reason"], rows))


def other_section(others: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in others for k in r))
    return "## Other JSON lines\n\n" + table(keys, [[r.get(k) for k in keys] for r in others])


def projection_section(stages: list[dict], best: dict[int, dict]) -> str:
    """Time for EPOCHS epochs of IN1K: per step, the fastest step at a batch size plus (rows
    after the first) a measured multi-crop stage at that batch size, run one after the other."""
    top = max(best.values(), key=lambda r: r["samples_per_s"])
    b, device = top["batch_size"], top.get("device_name", top.get("device", "GPU"))
    options = [("step alone (crops already on the device)", top["step_ms"])]
    for s in stages:
        if s.get("batch_size") == b and s.get("ms_per_batch") is not None:
            options.append((f"step + {s['stage']}", top["step_ms"] + s["ms_per_batch"]))
    steps_per_epoch = IN1K_TRAIN_IMAGES / b
    rows = [[what, round(ms, 3)] + [f"{EPOCHS * steps_per_epoch * ms / 1000 / 3600 / n:.1f} h"
                                    for n in GPUS] for what, ms in options]
    return (f"## Projection: {EPOCHS} t-ReX epochs of IN1K ({IN1K_TRAIN_IMAGES:,} images)\n"
            f"From the fastest step ({top['stage']}, batch {b} per GPU, {top['samples_per_s']} "
            f"samples/s). {GPUS[-1]} GPUs: linear scaling of the one-GPU time (gradient "
            "all-reduce not measured); the stage is added, not overlapped; CPU-side loading "
            "not included.\n\n"
            + table(["per step", "ms"] + [f"{n} x {device}" for n in GPUS], rows))


def summarize(folder: str) -> str:
    parts = ["# gpu_check summary"]
    env = os.path.join(folder, "env.txt")
    if os.path.isfile(env):
        parts.append(f"## Environment\n```\n{open(env).read().strip()}\n```")
    plan, records = read_stage_records(folder)
    by_kind, notes = load_rows(folder)
    if plan or records:
        errors = {r["stage"] for rows in by_kind.values() for r in failed_rows(rows)}
        parts.append(stages_section(plan, records, errors))
    best = fastest_steps(by_kind["step"])
    if by_kind["step"]:
        parts.append(step_section(by_kind["step"]))
    if by_kind["stage"]:
        parts.append(multicrop_section(by_kind["stage"], best))
    if by_kind["kernel"]:
        parts.append(kernel_section(by_kind["kernel"]))
    if by_kind["other"]:
        parts.append(other_section(by_kind["other"]))
    if best:
        parts.append(projection_section(by_kind["stage"], best))
    if notes:
        parts.append("## Notes\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(summarize(sys.argv[1] if len(sys.argv) > 1 else "bench_out"))
