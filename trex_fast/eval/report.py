"""What the paper reports, and how our results are set beside it.

The one home of the published t-ReX / t-ReX* points and of the trade-off figure, the paper's
Figure 1: IN1K top-1 on the x-axis, mean transfer log-odds on the y-axis, one point per model.
Both the transfer report (transfer.md, transfer.json, transfer.csv and trade_off.png in
--output_dir) and the sweep's report (trex_fast.sweep.report) draw it through `plot_trade_off`.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from pipelines import atomic
from trex_fast.eval.splits import AUTHORS_COUNTS

# The paper's Table/Figure 1 (ResNet-50, 100 epochs): (IN1K top-1 %, mean log-odds over the
# 15 datasets of the authors' model zoo, IN1K not among them). One home for these numbers.
PUBLISHED = {"t-ReX": (78.0, 1.170), "t-ReX*": (80.2, 0.883)}
# Reported beside the transfer mean, never in it: the authors' summary (naver/trex,
# transfer/scripts/print_results.py) drops the IN-1K column before averaging log-odds.
NOT_IN_MEAN = ("in1k",)
TRADE_OFF = "trade_off.png"  # the figure's one file name, for transfer runs and sweeps alike
NAMES = ("transfer.md", "transfer.json", "transfer.csv", TRADE_OFF)
LOG_ODDS = "mean transfer log-odds"


def authors_counts(dataset: str) -> str:
    """The authors' train (+ val) / test image counts of a named dataset, '' for others."""
    if dataset not in AUTHORS_COUNTS:
        return ""
    train, val, test = AUTHORS_COUNTS[dataset]
    return f"{train:,}{f' + {val:,}' if val else ''} / {test:,}"


def _mean_text(report: dict) -> str:
    mean = report["log_odds_mean"]
    return "n/a" if mean is None else f"{mean:.3f}"


def markdown(report: dict) -> str:
    rows = ["| dataset | probe | classes | split | n_train / n_val / n_test | authors' train "
            "(+ val) / test | top-1 mean | top-1 std | log-odds |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report["datasets"]:
        apart = " (not in the mean)" if r["dataset"] in NOT_IN_MEAN else ""
        rows.append(f"| {r['dataset']}{apart} | {r['probe']} | {r['classes']} | {r['split']} | "
                    f"{r['n_train']:,} / {r['n_val']:,} / {r['n_test']:,} | "
                    f"{authors_counts(r['dataset'])} | {r['top1_mean']:.2f} "
                    f"| {r['top1_std']:.2f} | {r['log_odds']:.3f} |")
    n = len(report["log_odds_datasets"])
    rows.append(f"| **mean log-odds ({n} transfer datasets)** | | | | | | | | "
                f"**{_mean_text(report)}** |")
    head = (f"# Transfer: {report['label']}\n\n{report['seeds']} seeds x {report['trials']} "
            f"Optuna trials per dataset, images {report['image_size']} px; top-1 in %, std over "
            f"seeds (sample); log-odds ln(p/(1-p)) of the mean top-1; the mean is over the "
            f"transfer datasets, IN1K apart (as in the authors' summary); n_train + n_val is "
            f"the train split, n_val the search's validation part of it.")
    if report.get("in1k_probe_top1") is not None:
        head += f" IN1K linear probe top-1: {report['in1k_probe_top1']:.2f}."
    if report.get("in1k_top1") is not None:
        head += f" IN1K top-1: {report['in1k_top1']:.2f}."
    return head + "\n\n" + "\n".join(rows) + "\n"


def write_csv(path: str, report: dict) -> None:
    fields = ("dataset", "probe", "classes", "split", "n_train", "n_val", "n_test",
              "train_images", "test_images", "top1_mean", "top1_std", "log_odds")
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(fields)
    for r in report["datasets"]:
        out.writerow([r[k] for k in fields])
    out.writerow(["mean_log_odds"] + [""] * (len(fields) - 2) + [report["log_odds_mean"]])
    atomic.write_bytes(path, text.getvalue().encode())


def _point(entry: str) -> ModelPoint:
    """(label, IN1K top-1, mean log-odds) of a --compare entry: a transfer.json (or any JSON
    with log_odds_mean and in1k_top1) or a run folder holding transfer.json."""
    path = os.path.join(entry, "transfer.json") if os.path.isdir(entry) else entry
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--compare: {entry!r} is neither a transfer JSON nor a run "
                                "folder holding transfer.json")
    with open(path) as f:
        report = json.load(f)
    if "log_odds_mean" not in report:
        raise ValueError(f"--compare: {path} has no log_odds_mean")
    label = report.get("label") or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return ModelPoint(label, report.get("in1k_top1"), report["log_odds_mean"])


@dataclass(frozen=True)
class ModelPoint:
    """One model on the trade-off figure: IN1K top-1 (x) and its transfer score (y)."""
    label: str
    in1k_top1: float | None
    score: float | None


def _published(ax, log_odds_axis: bool) -> None:
    """The paper's points as stars; on another y-axis (e.g. k-NN top-1) they have no y, so
    their IN1K top-1 is drawn as vertical lines."""
    for name, (top1, log_odds) in PUBLISHED.items():
        label = f"{name} (published)"
        if log_odds_axis:
            ax.scatter([top1], [log_odds], marker="*", s=160, color="grey", zorder=3)
            ax.annotate(label, (top1, log_odds), textcoords="offset points", xytext=(6, 4))
        else:
            ax.axvline(top1, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(label, (top1, 0.01), xycoords=("data", "axes fraction"),
                        textcoords="offset points", xytext=(2, 2), rotation=90, fontsize=8)


def plot_trade_off(path: str, points: list[ModelPoint], y_label: str = LOG_ODDS,
                   log_odds: bool = True) -> list[str]:
    """The paper's trade-off figure with the published points (scores are mean transfer
    log-odds unless `log_odds` is False, e.g. k-NN top-1); returns the labels of models
    left off for want of an IN1K top-1 (a model without a score, e.g. a run of IN1K alone,
    has no mean and is left off silently)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    skipped = []
    for p in points:
        if p.score is None:
            continue
        if p.in1k_top1 is None:
            skipped.append(p.label)
            continue
        ax.scatter([p.in1k_top1], [p.score], s=50, zorder=4)
        ax.annotate(p.label, (p.in1k_top1, p.score), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)
    _published(ax, log_odds)
    ax.set_xlabel("ImageNet-1K top-1 (%)")
    ax.set_ylabel(y_label)
    ax.margins(x=0.2, y=0.15)  # room for the labels right of the points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return skipped


def write_outputs(out_dir: str, report: dict,
                  compare: list[str]) -> tuple[list[str], list[str]]:
    """All four outputs; returns their paths and the models left off the plot."""
    points = [ModelPoint(report["label"], report.get("in1k_top1"), report["log_odds_mean"])]
    points += [_point(entry) for entry in compare]  # read first: a bad entry writes nothing
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in NAMES]
    atomic.write_bytes(paths[0], markdown(report).encode())
    atomic.write_json(paths[1], report)
    write_csv(paths[2], report)
    y_label = f"{LOG_ODDS} ({len(report['log_odds_datasets'])} datasets here; published: 15)"
    return paths, plot_trade_off(paths[3], points, y_label)
