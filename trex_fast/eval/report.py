"""What a transfer run writes in --output_dir: transfer.md, transfer.json, transfer.csv, and
trade_off.png, the paper's plot (IN1K top-1 against mean transfer log-odds, one point per
model, with the published t-ReX and t-ReX* points as references)."""
from __future__ import annotations

import csv
import io
import json
import os

from pipelines import atomic
from trex_fast.eval.splits import AUTHORS_COUNTS
from trex_fast.eval.transfer import NOT_IN_MEAN

# The paper's Table/Figure 1 (ResNet-50, 100 epochs): (IN1K top-1 %, mean log-odds over the
# 15 datasets of the authors' model zoo, IN1K not among them). One home for these numbers.
PUBLISHED = {"t-ReX": (78.0, 1.170), "t-ReX*": (80.2, 0.883)}
NAMES = ("transfer.md", "transfer.json", "transfer.csv", "trade_off.png")


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


def _point(entry: str) -> tuple[str, float | None, float]:
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
    return label, report.get("in1k_top1"), report["log_odds_mean"]


def plot_trade_off(path: str, report: dict, compare: list[str]) -> list[str]:
    """The trade-off plot; returns the labels of models left out for want of an IN1K top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(report["label"], report.get("in1k_top1"), report["log_odds_mean"])]
    points += [_point(entry) for entry in compare]
    points = [p for p in points if p[2] is not None]  # a run of IN1K alone has no mean
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (x, y) in PUBLISHED.items():
        ax.scatter([x], [y], marker="*", s=160, color="grey", zorder=3)
        ax.annotate(f"{name} (published)", (x, y), textcoords="offset points", xytext=(6, 4))
    skipped = []
    for label, x, y in points:
        if x is None:
            skipped.append(label)
            continue
        ax.scatter([x], [y], s=50, zorder=4)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, -10))
    ax.set_xlabel("ImageNet-1K top-1 (%)")
    ax.set_ylabel(f"mean transfer log-odds ({len(report['log_odds_datasets'])} datasets here; "
                  "published: 15)")
    ax.margins(x=0.2, y=0.15)  # room for the labels right of the points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return skipped


def write_outputs(out_dir: str, report: dict, compare: list[str]) -> list[str]:
    """All four outputs; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in NAMES]
    atomic.write_bytes(paths[0], markdown(report).encode())
    atomic.write_json(paths[1], report)
    write_csv(paths[2], report)
    skipped = plot_trade_off(paths[3], report, compare)
    if skipped:
        print(f"[transfer] not on the plot (no IN1K top-1; give --in1k_top1 or a JSON with "
              f"in1k_top1): {', '.join(skipped)}", flush=True)
    return paths
