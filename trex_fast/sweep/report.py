"""Collect a sweep: one row per point (its knob values, IN1K val top-1 from its metrics, and
optionally k-NN top-1 and mean transfer log-odds through trex_fast.eval), written as
summary.csv, summary.json and summary.md, and the trade-off figure tradeoff.png.

The figure is the paper's: IN1K top-1 against mean transfer log-odds, with the published
t-ReX and t-ReX* points as references; without transfer, against k-NN top-1 (the published
IN1K numbers then appear as reference lines); with neither, IN1K top-1 per point.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys

from pipelines import atomic
from trex_fast import runlog
from trex_fast.eval.report import PUBLISHED
from trex_fast.sweep.points import Point, point_status

# RECIPE.md "Published results" (ResNet-50, 100 epochs, global batch 256; the log-odds mean over
# 15 transfer datasets, IN1K not among them, as trex_fast.eval.transfer computes it).
PAPER_POINTS = {f"{name} (paper)": point for name, point in PUBLISHED.items()}


def knob_label(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "base"


def _eval_json(point: Point, kind: str, flags: dict) -> dict | None:
    """The JSON line `python -m trex_fast.eval <kind>` prints, computed in this process and
    cached in the run directory (a rerun of the sweep evaluates each finished point once)."""
    from trex_fast.eval import cli as eval_lib

    cache = os.path.join(point.run_dir, f"eval_{kind}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            getattr(eval_lib, kind)(**flags)
    except Exception as e:  # one point's failed evaluation leaves the others' rows intact
        print(f"[trex_fast.sweep] {point.name}: eval {kind} failed: {e!r}", file=sys.stderr,
              flush=True)
        return None
    lines = [ln for ln in printed.getvalue().splitlines() if ln.startswith("{")]
    if not lines:
        return None
    result = json.loads(lines[-1])
    runlog.write_json(cache, result)
    return result


def _data_root(point: Point) -> str:
    """The data root the run trained on, as training resolved it (config.json)."""
    with open(os.path.join(point.run_dir, "config.json")) as f:
        return json.load(f)["resolved"]["data_root"]


def point_row(point: Point, knn: bool, transfer: str) -> dict:
    status = point_status(point)
    records = [r for r in runlog.read_metrics(point.run_dir) if "val_top1" in r]
    last = records[-1] if records else {}
    row = {"point": point.name, **point.knobs, "status": status, "epochs_done": last.get("epoch"),
           "in1k_top1": last.get("val_top1"), "run_dir": point.run_dir}
    if status != "finished":
        return row
    common = dict(backbone=os.path.join(point.run_dir, "backbone.pth"), arch=point.cfg.arch,
                  device=point.cfg.device)
    if point.cfg.num_workers >= 0:  # else eval's own default
        common["num_workers"] = point.cfg.num_workers
    if knn:
        root = _data_root(point)
        result = _eval_json(point, "knn", dict(common, train=os.path.join(root, "train"),
                                               val=os.path.join(root, "val"),
                                               image_size=point.cfg.global_size))
        row["knn_top1"] = result["top1"] if result else None
    if transfer:  # a feature cache per point: every point's backbone file is backbone.pth
        result = _eval_json(point, "transfer", dict(
            common, datasets=transfer, cache_dir=os.path.join(point.run_dir, "transfer_cache")))
        row["transfer_log_odds"] = result["log_odds_mean"] if result else None
    return row


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (tuple, list)):
        return ",".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def write_tables(rows: list[dict], output_dir: str) -> dict[str, str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    paths = {ext: os.path.join(output_dir, f"summary.{ext}") for ext in ("csv", "json", "md")}
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: _cell(row.get(k)) for k in columns} for row in rows)
    atomic.write_bytes(paths["csv"], text.getvalue().encode())
    runlog.write_json(paths["json"], rows)
    shown = [c for c in columns if c != "run_dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    atomic.write_bytes(paths["md"], ("\n".join(lines) + "\n").encode())
    return paths


def plot_tradeoff(rows: list[dict], knobs: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(row, k) for row, k in zip(rows, knobs) if row.get("in1k_top1") is not None]
    x_key = next((key for key in ("transfer_log_odds", "knn_top1")
                  if any(row.get(key) is not None for row, _ in done)), None)
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (row, k) in enumerate(done):
        x = row.get(x_key) if x_key else i
        if x is None:
            continue
        ax.scatter([x], [row["in1k_top1"]], color="tab:blue")
        ax.annotate(knob_label(k), (x, row["in1k_top1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    for name, (top1, log_odds) in PAPER_POINTS.items():
        if x_key == "transfer_log_odds":
            ax.scatter([log_odds], [top1], marker="*", s=150, color="tab:red")
            ax.annotate(name, (log_odds, top1), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color="tab:red")
        else:  # the published points have no k-NN number: their IN1K top-1 as lines
            ax.axhline(top1, color="tab:red", linestyle="--", linewidth=0.8)
            ax.annotate(f"{name} IN1K", (0.01, top1), xycoords=("axes fraction", "data"),
                        xytext=(0, 2), textcoords="offset points", fontsize=8, color="tab:red")
    ax.set_xlabel({"transfer_log_odds": "mean transfer log-odds",
                   "knn_top1": "k-NN top-1 (%)"}.get(x_key, "point"))
    ax.set_ylabel("IN1K val top-1 (%)")
    ax.set_title("IN1K accuracy vs transfer: the sweep's points")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def collect(points: list[Point], output_dir: str, knn: bool = False,
            transfer: str = "") -> dict:
    """Rows of every point (unfinished ones with their status), the tables and the figure."""
    rows = [point_row(p, knn, transfer) for p in points]
    paths = write_tables(rows, output_dir)
    paths["png"] = plot_tradeoff(rows, [p.knobs for p in points],
                                 os.path.join(output_dir, "tradeoff.png"))
    finished = sum(row["status"] == "finished" for row in rows)
    print(f"[trex_fast.sweep] {finished}/{len(rows)} points finished; summary in "
          f"{paths['md']}, figure {paths['png']}", flush=True)
    return {"rows": rows, "paths": paths}
