"""Evaluation as functions that return results (issue #23 item 1): one home for the published
points and the trade-off figure, the sweep reads eval's return values (no stdout), and the
eval commands' worker default fits the machine (item 3). Unit tests: no training."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from trex_fast.eval import knn as eval_knn
from trex_fast.eval import report as eval_report
from trex_fast.sweep import report as sweep_report
from trex_fast.sweep.points import build_points, parse_grid

ROOT = Path(REPO)


def _finished_points(tmp_path, grid="clf_tau=0.1,0.2"):
    points = build_points({"epochs": 1, "warmup_epochs": 0}, parse_grid(grid), [],
                          str(tmp_path))
    for i, point in enumerate(points):  # finished runs, as training leaves them
        os.makedirs(point.run_dir)
        Path(point.run_dir, "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "step": 2, "val_top1": 70.0 + i}) + "\n")
        Path(point.run_dir, "backbone.pth").write_bytes(b"")
        Path(point.run_dir, "config.json").write_text(
            json.dumps({"resolved": {"data_root": "/data/root"}}))
    return points


def test_the_published_points_are_written_once():
    """1.170 and 0.883 (the paper's mean log-odds) appear in one module of the package."""
    homes = [str(p.relative_to(ROOT)) for p in (ROOT / "trex_fast").rglob("*.py")
             if re.search(r"\b1\.170?\b", p.read_text()) and "0.883" in p.read_text()]
    assert homes == ["trex_fast/eval/report.py"]
    assert eval_report.PUBLISHED == {"t-ReX": (78.0, 1.170), "t-ReX*": (80.2, 0.883)}


def test_the_sweep_and_the_transfer_report_draw_the_one_figure_under_one_name(tmp_path,
                                                                             monkeypatch):
    drawn = []

    def record(path, points, y_label=eval_report.LOG_ODDS, log_odds=True):
        drawn.append((os.path.basename(path), points, log_odds))
        return []

    monkeypatch.setattr(eval_report, "plot_trade_off", record)
    monkeypatch.setattr(sweep_report, "plot_trade_off", record)  # its name for the same function
    assert sweep_report.plot_trade_off is eval_report.plot_trade_off
    points = _finished_points(tmp_path / "sweep")
    rows = sweep_report.collect(points, str(tmp_path / "sweep"))["rows"]
    report = {"label": "a", "in1k_top1": 76.0, "log_odds_mean": 0.7, "seeds": 1, "trials": 1,
              "image_size": 32, "log_odds_datasets": ["d"], "datasets": []}
    eval_report.write_outputs(str(tmp_path / "transfer"), report, [])
    assert [name for name, _, _ in drawn] == ["trade_off.png", "trade_off.png"]
    sweep_points, transfer_points = drawn[0][1], drawn[1][1]
    assert [p.in1k_top1 for p in sweep_points] == [r["in1k_top1"] for r in rows] == [70.0, 71.0]
    assert transfer_points == [eval_report.ModelPoint("a", 76.0, 0.7)]


def test_the_figure_has_the_papers_axes(tmp_path, monkeypatch):
    """Figure 1 of the paper: IN1K top-1 on x, mean transfer log-odds on y."""
    import matplotlib.pyplot as plt

    stars, labels = [], {}
    monkeypatch.setattr(plt.Axes, "scatter", lambda self, x, y, **k: stars.append((x[0], y[0])))
    monkeypatch.setattr(plt.Axes, "set_xlabel", lambda self, text: labels.update(x=text))
    monkeypatch.setattr(plt.Axes, "set_ylabel", lambda self, text: labels.update(y=text))
    eval_report.plot_trade_off(str(tmp_path / "f.png"),
                               [eval_report.ModelPoint("ours", 75.5, 0.9)])
    assert stars == [(75.5, 0.9), (78.0, 1.170), (80.2, 0.883)]
    assert "ImageNet-1K top-1" in labels["x"] and "log-odds" in labels["y"]


def test_the_sweep_reads_knn_from_the_function_not_from_stdout(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_knn(settings):  # returns its result and prints nothing
        calls.append(settings)
        return {"eval": "knn", "k": settings.k, "temperature": settings.temperature,
                "top1": 42.5 + len(calls)}

    monkeypatch.setattr(eval_knn, "evaluate_knn", fake_knn)
    points = _finished_points(tmp_path)
    rows = sweep_report.collect(points, str(tmp_path), knn=True)["rows"]
    assert [r["knn_top1"] for r in rows] == [43.5, 44.5]
    assert calls[0].train == "/data/root/train" and calls[0].val == "/data/root/val"
    assert calls[0].backbone == os.path.join(points[0].run_dir, "backbone.pth")
    assert "{" not in capsys.readouterr().out  # no JSON line went through stdout
    cached = json.loads(Path(points[0].run_dir, "eval_knn.json").read_text())
    assert cached["top1"] == 43.5


def test_knn_by_default_starts_no_more_workers_than_a_2_core_machine_has(tmp_path,
                                                                         monkeypatch):
    """The old default of 4 workers made torch warn (twice) on a 2-core machine."""
    from pipelines.demo_data import write_dataset

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    write_dataset(str(tmp_path / "data"), train_per_class=1, val_per_class=1)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())
    monkeypatch.setattr(eval_knn, "load_backbone", lambda path, arch, trust: tiny)
    settings = eval_knn.KnnSettings("b.pth", str(tmp_path / "data" / "train"),
                                    str(tmp_path / "data" / "val"), image_size=32,
                                    batch_size=8, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = eval_knn.evaluate_knn(settings)
    assert 0.0 <= result["top1"] <= 100.0 and result["eval"] == "knn"
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message)
                                                                   for w in caught]
    with pytest.warns(UserWarning, match="worker"):  # the check above can fail: 4 would warn
        torch.utils.data.DataLoader([0], num_workers=4).check_worker_number_rationality()
