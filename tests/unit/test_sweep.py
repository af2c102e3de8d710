"""The sweep (issue #17), no process started: the grid, file and named points, validation
before any work, cached transfer rows and the trade-off figure, the dry run."""
import json
import os
import textwrap

import pytest

from trex_fast.cli import parse_flags
from trex_fast.config import make_config
from trex_fast.sweep.cli import main
from trex_fast.sweep.points import SweepError, build_points, load_file, parse_base, parse_grid


# ---------------------------------------------------------------------------------------------
# the spec and its validation
# ---------------------------------------------------------------------------------------------
def test_grid_file_and_named_points_expand_with_flags_that_round_trip(tmp_path):
    assert parse_grid("pr_hidden_layers=1,3 global_scale=(0.25,1.0),(0.4,1.0) preset=trex,plain") \
        == {"pr_hidden_layers": [1, 3], "global_scale": [(0.25, 1.0), (0.4, 1.0)],
            "preset": ["trex", "plain"]}
    assert parse_base("--data=/d --epochs=2 --global_scale=0.4,1.0") == {
        "data": "/d", "epochs": 2, "global_scale": (0.4, 1.0)}
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(textwrap.dedent("""
        base: {preset: trex, epochs: 2, warmup_epochs: 0}
        grid: {ema_momentum: [0.99, 0.999]}
        points:
          - {name: star_like, pr_hidden_layers: 1, global_scale: [0.4, 1.0]}
    """))
    spec = load_file(str(spec_path))
    points = build_points(spec["base"], parse_grid(spec["grid"]), spec["points"], str(tmp_path))
    assert [p.name for p in points] == ["ema_momentum-0.99", "ema_momentum-0.999", "star_like"]
    star = points[-1]
    assert star.cfg.global_scale == (0.4, 1.0) and star.cfg.pr_hidden_layers == 1
    assert star.cfg.epochs == 2 and star.run_dir == str(tmp_path / "star_like")
    assert points[0].cfg.ema_momentum == 0.99 and points[0].knobs == {"ema_momentum": 0.99}
    for point in points:  # the command's flags read back (stand-in parser) as the same config
        assert make_config(**parse_flags(point.train_argv())) == point.cfg


@pytest.mark.parametrize("flags, message", [
    (["--grid=pr_hiden_layers=1,3"], "unknown flag --pr_hiden_layers. Did you mean "
                                     "--pr_hidden_layers"),
    (["--grid=memory_size=0,-8"], "--memory_size=-8: must be >= 0"),
    (["--grid=memory_size=0,8", "--base=--batch_size=16"], "point memory_size-8: --memory_size=8"),
    (["--base=--output_dir=x"], "--output_dir is set by the sweep"),
    (["--grid=memory_size=32", "--base=--batch_size=8", "--launcher=torchrun",
      "--nproc_per_node=8"], "0 or >= the global batch 64"),  # training's check_world
    (["--launcher=pbs"], "--launcher='pbs': accepted values are local, torchrun, slurm"),
    (["--gird=memory_size=0"], "unknown sweep flag --gird. Did you mean --grid?"),
])
def test_bad_key_or_value_is_refused_naming_it_before_any_work(tmp_path, capsys, flags,
                                                               message):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        main(**parse_flags([*flags, f"--output_dir={out}"]))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing run


def test_a_bad_named_point_in_a_file_is_named(tmp_path):
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"points": [{"name": "ok", "clf_tau": 0.2},
                                           {"name": "bad", "clf_tua": 0.2}]}))
    with pytest.raises(SweepError, match="point bad: unknown flag --clf_tua"):
        build_points({}, {}, load_file(str(spec))["points"], str(tmp_path))


def test_a_bad_grid_value_is_blamed_not_the_valid_ones_before_it(tmp_path):
    assert parse_grid("memory_size=64,128,abc g=(0.4,1.0),x") == {
        "memory_size": [64, 128, "abc"], "g": [(0.4, 1.0), "x"]}
    with pytest.raises(SweepError, match="point memory_size-abc: --memory_size='abc'"):
        build_points({}, parse_grid("memory_size=64,128,abc"), [], str(tmp_path))


def test_transfer_rows_are_cached_and_the_figure_uses_log_odds_with_the_papers_points(
        tmp_path, monkeypatch):
    from trex_fast.eval import transfer as eval_transfer
    from trex_fast.sweep import report as sweep_report

    calls = []

    def fake_transfer(settings):  # evaluate_transfer's contract: the outcome, report inside
        calls.append(settings)
        report = {"datasets": [], "log_odds_mean": 0.5, "in1k_probe_top1": None,
                  "features_reused": False}
        return eval_transfer.TransferOutcome(report, [], [])

    monkeypatch.setattr(eval_transfer, "evaluate_transfer", fake_transfer)
    points = build_points({"epochs": 1, "warmup_epochs": 0}, parse_grid("clf_tau=0.1,0.2"), [],
                          str(tmp_path))
    for point in points:  # finished runs, as training leaves them
        os.makedirs(point.run_dir)
        (tmp_path / point.name / "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "step": 2, "val_top1": 70.0}) + "\n")
        (tmp_path / point.name / "backbone.pth").write_bytes(b"")
    rows = sweep_report.collect(points, str(tmp_path), transfer=("/data/dtd",))["rows"]
    assert [r["transfer_log_odds"] for r in rows] == [0.5, 0.5]
    assert calls[0].cache_dir == os.path.join(points[0].run_dir, "transfer_cache")
    sweep_report.collect(points, str(tmp_path), transfer=("/data/dtd",))
    assert len(calls) == 2  # the rerun read eval_transfer.json
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch.setattr(plt.Axes, "annotate", lambda self, text, *a, **k: drawn.append(text))
    sweep_report.plot_points(rows, [p.knobs for p in points], str(tmp_path / "f.png"))
    assert drawn == ["clf_tau=0.1", "clf_tau=0.2", "t-ReX (published)", "t-ReX* (published)"]


def test_dry_run_prints_each_points_command_and_writes_nothing(tmp_path, capsys):
    from trex_fast.sweep.cli import SweepSettings, sweep

    out = tmp_path / "dry"
    result = sweep(SweepSettings(grid="global_scale=(0.25,1.0),(0.4,1.0)",
                                 base="--epochs=2 --warmup_epochs=0", output_dir=str(out),
                                 launcher="torchrun", nproc_per_node=2, dry_run=True))
    assert result["status"] == {"global_scale-0.25-1.0": "pending",
                                "global_scale-0.4-1.0": "pending"}
    printed = capsys.readouterr().out
    assert printed.count("torch.distributed.run --standalone --nproc_per_node=2") == 2
    assert "'--global_scale=(0.4, 1.0)'" in printed and not out.exists()
