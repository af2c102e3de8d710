"""Collect a sweep: one row per point (its knob values, IN1K val top-1 from its metrics, and
optionally k-NN top-1 and mean transfer log-odds from trex_fast.eval's functions), written as
summary.csv, summary.json and summary.md, and the trade-off figure trade_off.png.

The figure is the paper's, drawn by trex_fast.eval.report (the one home of the published
points): IN1K top-1 (x) against mean transfer log-odds (y), with the published t-ReX and t-ReX*
points; without transfer, against k-NN top-1 (the published IN1K numbers then appear as
vertical lines); with neither, each point on its own row.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys

from pipelines import atomic
from trex_fast import runlog
from trex_fast.eval.report import LOG_ODDS, TRADE_OFF, ModelPoint, plot_trade_off
from trex_fast.sweep.points import Point, point_status


def knob_label(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "base"


def _evaluated(point: Point, kind: str, evaluate) -> dict | None:
    """`evaluate()`'s result (an eval function's dict), computed in this process and cached
    in the run directory as eval_<kind>.json (a rerun evaluates each finished point once)."""
    cache = os.path.join(point.run_dir, f"eval_{kind}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    try:
        result = evaluate()
    except Exception as e:  # one point's failed evaluation leaves the others' rows intact
        print(f"[trex_fast.sweep] {point.name}: eval {kind} failed: {e!r}", file=sys.stderr,
              flush=True)
        return None
    atomic.write_json(cache, result)
    return result


def _knn(point: Point, common: dict) -> dict:
    from trex_fast.eval import knn as eval_knn

    root = _data_root(point)
    return eval_knn.evaluate_knn(eval_knn.KnnSettings(
        **common, train=os.path.join(root, "train"), val=os.path.join(root, "val"),
        image_size=point.cfg.global_size))


def _transfer(point: Point, common: dict, datasets: tuple[str, ...]) -> dict:
    """A feature cache and outputs per point: every point's backbone file is backbone.pth."""
    from trex_fast.eval import transfer as eval_transfer

    outcome = eval_transfer.evaluate_transfer(eval_transfer.TransferSettings(
        **common, datasets=datasets, label=point.name,
        output_dir=os.path.join(point.run_dir, "transfer"),
        cache_dir=os.path.join(point.run_dir, "transfer_cache")))
    return eval_transfer.summary(outcome.report)


def _data_root(point: Point) -> str:
    """The data root the run trained on, as training resolved it (config.json)."""
    with open(os.path.join(point.run_dir, "config.json")) as f:
        return json.load(f)["resolved"]["data_root"]


def point_row(point: Point, knn: bool, transfer: tuple[str, ...]) -> dict:
    status = point_status(point)
    records = [r for r in runlog.read_metrics(point.run_dir) if runlog.VAL_TOP1 in r]
    last = records[-1] if records else {}
    row = {"point": point.name, **point.knobs, "status": status, "epochs_done": last.get("epoch"),
           "in1k_top1": last.get(runlog.VAL_TOP1), "run_dir": point.run_dir}
    if status != "finished":
        return row
    common = dict(backbone=os.path.join(point.run_dir, "backbone.pth"), arch=point.cfg.arch,
                  device=point.cfg.device, num_workers=point.cfg.num_workers)
    if knn:
        result = _evaluated(point, "knn", lambda: _knn(point, common))
        row["knn_top1"] = result["top1"] if result else None
    if transfer:
        result = _evaluated(point, "transfer", lambda: _transfer(point, common, transfer))
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
    atomic.write_json(paths["json"], rows)
    shown = [c for c in columns if c != "run_dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    atomic.write_bytes(paths["md"], ("\n".join(lines) + "\n").encode())
    return paths


def plot_points(rows: list[dict], knobs: list[dict], path: str) -> str:
    """The trade-off figure of the sweep's points: y is the mean transfer log-odds, else the
    k-NN top-1, else each point's row number."""
    score = next((key for key in ("transfer_log_odds", "knn_top1")
                  if any(row.get(key) is not None for row in rows)), None)
    points = [ModelPoint(knob_label(k), row.get("in1k_top1"), row.get(score) if score else i)
              for i, (row, k) in enumerate(zip(rows, knobs))]
    y_label = {"transfer_log_odds": LOG_ODDS, "knn_top1": "k-NN top-1 (%)"}.get(
        score, "point (no --knn or --transfer)")
    plot_trade_off(path, points, y_label, log_odds=score == "transfer_log_odds")
    return path


def collect(points: list[Point], output_dir: str, knn: bool = False,
            transfer: tuple[str, ...] = ()) -> dict:
    """Rows of every point (unfinished ones with their status), the tables and the figure."""
    rows = [point_row(p, knn, transfer) for p in points]
    paths = write_tables(rows, output_dir)
    paths["png"] = plot_points(rows, [p.knobs for p in points],
                               os.path.join(output_dir, TRADE_OFF))
    finished = sum(row["status"] == "finished" for row in rows)
    print(f"[trex_fast.sweep] {finished}/{len(rows)} points finished; summary in "
          f"{paths['md']}, figure {paths['png']}", flush=True)
    return {"rows": rows, "paths": paths}
