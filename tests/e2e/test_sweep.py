"""The sweep end to end (issue #17): 2 x 2 points trained, the interrupted one resumed, the
summary and figure, and a rerun that trains nothing."""
import csv
import json
import os

from tests._runs import sweep_base, sweep_cli
from trex_fast.config import make_config
from trex_fast.sweep.points import build_points, parse_base, parse_grid

GRID = "pr_hidden_layers=0,1 memory_size=0,32"
INTERRUPTED = "pr_hidden_layers-1__memory_size-32"


def _snapshot(out, names):
    return {n: (os.path.getmtime(os.path.join(out, n, "checkpoint.pt")),
                open(os.path.join(out, n, "train.log")).read()) for n in names}


# ---------------------------------------------------------------------------------------------
# a real sweep: 2 x 2 tiny 1-epoch runs on real JPEGs (the session's demo_data), one of them
# interrupted before
# ---------------------------------------------------------------------------------------------
def test_sweep_trains_each_point_resumes_the_interrupted_one_and_a_rerun_trains_nothing(
        demo_data, tmp_path):
    from trex_fast.train import run

    out = tmp_path / "sweep"
    base = sweep_base(demo_data)
    points = build_points(parse_base(base), parse_grid(GRID), [], str(out))
    assert len(points) == 4
    # a point killed mid-epoch: its checkpoint at global step 1 of 2, as a SIGTERM leaves it
    interrupted = next(p for p in points if p.name == INTERRUPTED)
    assert run(make_config(**interrupted.flags, stop_at_step=1))["stopped_at_step"] == 1

    proc = sweep_cli(f"--grid={GRID}", f"--base={base}", f"--output_dir={out}", "--knn=True")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{INTERRUPTED}: interrupted" in proc.stdout
    assert proc.stdout.count("[trex_fast.sweep] start ") == 4
    for point in points:
        run_dir = out / point.name
        for name in ("point.json", "config.json", "metrics.jsonl", "checkpoint.pt",
                     "backbone.pth", "train.log"):
            assert (run_dir / name).is_file(), (point.name, name)
        resolved = json.loads((run_dir / "point.json").read_text())["config"]
        assert resolved["pr_hidden_layers"] == point.knobs["pr_hidden_layers"]
        assert resolved["memory_size"] == point.knobs["memory_size"]
        log = (run_dir / "train.log").read_text()
        # only the interrupted point continued, from its own checkpoint
        assert ("resumed from" in log and "global step 1" in log) == (point.name == INTERRUPTED)
        records = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in records] == [2]  # 1 epoch of 2 steps, once

    rows = json.loads((out / "summary.json").read_text())
    assert [r["point"] for r in rows] == [p.name for p in points]
    for row, point in zip(rows, points):
        assert row["status"] == "finished" and row["epochs_done"] == 1
        assert row["pr_hidden_layers"] == point.knobs["pr_hidden_layers"]
        assert 0 <= row["in1k_top1"] <= 100 and 0 <= row["knn_top1"] <= 100
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["memory_size"] for r in table] == ["0", "32", "0", "32"]
    assert "| point | pr_hidden_layers | memory_size |" in (out / "summary.md").read_text()
    png = (out / "trade_off.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # rerun: every point is finished, nothing trains, the summary is written again
    before = _snapshot(out, [p.name for p in points])
    (out / "summary.json").unlink()
    again = sweep_cli(f"--grid={GRID}", f"--base={base}", f"--output_dir={out}", "--knn=True")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "start " not in again.stdout and again.stdout.count(": finished") == 4
    assert _snapshot(out, [p.name for p in points]) == before
    assert json.loads((out / "summary.json").read_text()) == rows


