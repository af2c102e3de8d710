"""The transfer evaluation CLI end to end (issue #16): two datasets, two seeds, the table, JSON,
CSV and figure, and a second run that reads every split from the feature cache."""
import os

import pytest

from tests.helpers import REPO


def test_transfer_run_writes_table_json_csv_plot_and_reuses_the_cache(layouts, demo_data,
                                                                     tmp_path):
    """Two fabricated datasets (one by name, one ImageFolder root: the session's demo_data as
    `textures`), 2 seeds, a --compare entry; the second run reads every split from the feature
    cache."""
    import csv
    import json
    import subprocess
    import sys

    import torch
    import torchvision

    from trex_fast.eval.probes import log_odds
    from trex_fast.eval.report import PUBLISHED

    root, _ = layouts
    textures = tmp_path / "textures"  # the demo ImageFolder, under the name the report shows
    textures.symlink_to(demo_data)
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"label": "baseline", "in1k_top1": 76.1,
                                 "log_odds_mean": 0.5}))

    def run(out):
        cmd = [sys.executable, "-m", "trex_fast.eval", "transfer", f"--backbone={weights}",
               f"--datasets=dtd,{textures}", f"--data_root={root}",
               "--arch=resnet18", "--image_size=32", "--trials=2", "--seeds=2",
               f"--cache_dir={tmp_path / 'cache'}", f"--output_dir={out}", "--in1k_top1=70.5",
               f"--compare={other}", "--num_workers=0", "--device=cpu"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "| dtd |" in proc.stdout and "| textures |" in proc.stdout  # the table, printed
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run(tmp_path / "out1")
    assert set(first["top1"]) == {"dtd", "textures"}
    assert all(0.0 <= top1 <= 100.0 for top1 in first["top1"].values())
    assert len(os.listdir(tmp_path / "cache")) == 1  # one folder per backbone
    cache_files = sorted(os.listdir(tmp_path / "cache" / os.listdir(tmp_path / "cache")[0]))
    assert len(cache_files) == 4 and all(f.endswith("_32px.pt") for f in cache_files)
    stamps = {f: os.path.getmtime(tmp_path / "cache" / os.listdir(tmp_path / "cache")[0] / f)
              for f in cache_files}
    second = run(tmp_path / "out2")
    assert not first["features_reused"] and second["features_reused"]
    assert stamps == {f: os.path.getmtime(tmp_path / "cache" / os.listdir(tmp_path / "cache")[0]
                                          / f) for f in cache_files}
    assert second["top1"] == first["top1"]  # same features, same seeds: same scores

    out = tmp_path / "out1"
    for name in ("transfer.md", "transfer.json", "transfer.csv", "trade_off.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "transfer.json").read_text())
    assert [r["dataset"] for r in report["datasets"]] == ["dtd", "textures"]
    for r in report["datasets"]:
        assert len(r["top1_per_seed"]) == 2 and len(r["per_seed"]) == 2
        assert r["top1_mean"] == pytest.approx(sum(r["top1_per_seed"]) / 2)
        a, b = r["top1_per_seed"]
        assert r["top1_std"] == pytest.approx(abs(a - b) / 2 ** 0.5)  # sample std of two
        assert r["log_odds"] == pytest.approx(log_odds(r["top1_mean"]))
        assert r["probe"] == "lbfgs" and all("C" in s for s in r["per_seed"])
    assert report["log_odds_mean"] == pytest.approx(
        sum(r["log_odds"] for r in report["datasets"]) / 2)
    assert report["in1k_top1"] == 70.5 and report["seeds"] == 2 and report["trials"] == 2
    assert report["in1k_probe_top1"] is None and report["log_odds_datasets"] == ["dtd", "textures"]
    dtd_row = report["datasets"][0]
    assert dtd_row["split"] == "official partition 1: train1 + val1 / test1"
    assert (dtd_row["n_train"] + dtd_row["n_val"], dtd_row["n_test"]) == (12, 6)
    rows = list(csv.DictReader(open(out / "transfer.csv")))
    assert [r["dataset"] for r in rows] == ["dtd", "textures", "mean_log_odds"]
    assert float(rows[0]["top1_mean"]) == pytest.approx(report["datasets"][0]["top1_mean"])
    assert int(rows[0]["n_val"]) == dtd_row["n_val"] and rows[1]["split"].startswith("ImageFolder")
    table = (out / "transfer.md").read_text()
    assert "| dtd | lbfgs | 3 |" in table and "mean log-odds (2 transfer datasets)" in table
    assert (out / "trade_off.png").read_bytes()[:4] == b"\x89PNG"
    assert PUBLISHED == {"t-ReX": (78.0, 1.170), "t-ReX*": (80.2, 0.883)}
