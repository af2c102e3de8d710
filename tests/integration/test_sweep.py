"""The sweep (issue #17): validation before any work, one run directory per point, reruns that
train nothing, interrupted points resumed through training's own resume, the launchers, and
the collected summary and trade-off figure."""
import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipelines.demo_data import write_dataset
from tests.helpers import REPO
from trex_fast.cli import parse_flags
from trex_fast.config import make_config
from trex_fast.sweep.cli import main
from trex_fast.sweep.launch import Job, LaunchSettings, PointJob, gpu_slots, run_jobs
from trex_fast.sweep.points import SweepError, build_points, load_file, parse_base, parse_grid

GRID = "pr_hidden_layers=0,1 memory_size=0,32"
INTERRUPTED = "pr_hidden_layers-1__memory_size-32"


def tiny_base(data: str) -> str:
    return (f"--data={data} --preset=demo --arch=resnet18 --batch_size=8 --global_size=32 "
            "--local_size=16 --local_crops=1 --pr_hidden_dim=32 --num_workers=0 --epochs=1 "
            "--warmup_epochs=0 --device=cpu --channels_last=False --log_every=2")


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_in1k")
    write_dataset(str(root), train_per_class=2, val_per_class=1)  # 8 classes: 16 + 8 images
    return str(root)


def _sweep(*flags, timeout=900):
    return subprocess.run([sys.executable, "-m", "trex_fast.sweep", *flags], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


def _snapshot(out, names):
    return {n: (os.path.getmtime(os.path.join(out, n, "checkpoint.pt")),
                open(os.path.join(out, n, "train.log")).read()) for n in names}


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


# ---------------------------------------------------------------------------------------------
# a real sweep: 2 x 2 tiny 1-epoch runs on real JPEGs, one of them interrupted before
# ---------------------------------------------------------------------------------------------
def test_sweep_trains_each_point_resumes_the_interrupted_one_and_a_rerun_trains_nothing(
        tiny_imagefolder, tmp_path):
    from trex_fast.train import run

    out = tmp_path / "sweep"
    base = tiny_base(tiny_imagefolder)
    points = build_points(parse_base(base), parse_grid(GRID), [], str(out))
    assert len(points) == 4
    # a point killed mid-epoch: its checkpoint at global step 1 of 2, as a SIGTERM leaves it
    interrupted = next(p for p in points if p.name == INTERRUPTED)
    assert run(make_config(**interrupted.flags, stop_at_step=1))["stopped_at_step"] == 1

    proc = _sweep(f"--grid={GRID}", f"--base={base}", f"--output_dir={out}", "--knn=True")
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
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # rerun: every point is finished, nothing trains, the summary is written again
    before = _snapshot(out, [p.name for p in points])
    (out / "summary.json").unlink()
    again = _sweep(f"--grid={GRID}", f"--base={base}", f"--output_dir={out}", "--knn=True")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "start " not in again.stdout and again.stdout.count(": finished") == 4
    assert _snapshot(out, [p.name for p in points]) == before
    assert json.loads((out / "summary.json").read_text()) == rows


def test_slurm_launcher_through_submitits_local_executor_is_collected(tiny_imagefolder,
                                                                       tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "slurm"
    proc = _sweep("--grid=clf_tau=0.2", f"--base={tiny_base(tiny_imagefolder)} --memory_size=32",
                  f"--output_dir={out}", "--launcher=slurm", "--cluster=local",
                  "--gpus_per_node=0", "--time_min=10")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted clf_tau-0.2: job" in proc.stdout
    job_id = (out / "clf_tau-0.2" / "job_id").read_text().strip()
    assert list((out / "submitit").glob(f"{job_id}*"))  # submitit's own job folder
    rows = json.loads((out / "summary.json").read_text())
    assert rows[0]["status"] == "finished" and rows[0]["clf_tau"] == 0.2
    assert rows[0]["in1k_top1"] is not None and (out / "tradeoff.png").is_file()


def test_torchrun_launcher_trains_a_point_with_two_processes(tiny_imagefolder, tmp_path):
    out = tmp_path / "torchrun"
    base = f"{tiny_base(tiny_imagefolder)} --batch_size=4 --memory_size=16"
    proc = _sweep("--grid=clf_tau=0.2", f"--base={base}", f"--output_dir={out}",
                  "--launcher=torchrun", "--nproc_per_node=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resolved = json.loads((out / "clf_tau-0.2" / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["global_batch"] == 8
    assert json.loads((out / "summary.json").read_text())[0]["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# launchers, with stand-in commands (no training)
# ---------------------------------------------------------------------------------------------
def _child(script: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(script)]


def test_parallel_local_gives_each_running_point_its_own_gpu(tmp_path):
    slots = gpu_slots(LaunchSettings(parallel=2))
    assert slots == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert gpu_slots(LaunchSettings(launcher="torchrun", nproc_per_node=2, parallel=2,
                                    gpus="4,5,6,7")) == [{"CUDA_VISIBLE_DEVICES": "4,5"},
                                                         {"CUDA_VISIBLE_DEVICES": "6,7"}]
    assert gpu_slots(LaunchSettings()) == [{}]  # one at a time: every GPU the sweep sees
    with pytest.raises(SweepError, match="needs 4 GPUs; --gpus gives 3"):
        gpu_slots(LaunchSettings(parallel=4, gpus="0,1,2"))
    script = """
        import os, sys, time
        start = time.time()
        time.sleep(1.5)
        open(sys.argv[1], "w").write(f"{os.environ['CUDA_VISIBLE_DEVICES']} {start} {time.time()}")
    """
    jobs = [Job(f"p{i}", [*_child(script), str(tmp_path / f"p{i}.txt")],
                str(tmp_path / f"p{i}" / "train.log")) for i in range(3)]
    codes = run_jobs(jobs, slots, poll_s=0.05)
    assert codes == {"p0": 0, "p1": 0, "p2": 0}
    (gpu0, start0, end0), (gpu1, start1, end1), (_, start2, _) = [
        (t.split()[0], *map(float, t.split()[1:]))
        for t in ((tmp_path / f"p{i}.txt").read_text() for i in range(3))]
    assert (gpu0, gpu1) == ("0", "1")
    assert start1 < end0 and start0 < end1  # p0 and p1 ran at the same time
    assert start2 >= min(end0, end1)  # p2 waited for a free slot


_SAVES_ON_SIGTERM = """
    import signal, sys, time
    def save(signum, frame):
        open(sys.argv[1], "w").write("checkpoint")
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, save)
    open(sys.argv[2], "w").write("started")
    time.sleep(60)
"""


def test_sigterm_to_the_sweep_reaches_the_running_point_and_starts_no_more(tmp_path):
    jobs = [Job(f"p{i}", [*_child(_SAVES_ON_SIGTERM), str(tmp_path / f"saved{i}"),
                          str(tmp_path / f"up{i}")],
                str(tmp_path / f"p{i}" / "train.log")) for i in range(2)]
    runner = tmp_path / "runner.py"
    runner.write_text("import pickle, sys\nfrom trex_fast.sweep.launch import run_jobs\n"
                      f"run_jobs(pickle.loads({pickle.dumps(jobs)!r}), [{{}}], poll_s=0.05)\n")
    sweep = subprocess.Popen([sys.executable, str(runner)], cwd=REPO, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": REPO},
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "up0").exists() and time.time() < deadline:
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=60)[0]
    assert sweep.returncode == 128 + signal.SIGTERM, output
    assert (tmp_path / "saved0").read_text() == "checkpoint"  # the point saved before exiting
    assert not (tmp_path / "up1").exists()  # the next point was never started
    assert "rerun the same command to continue" in output




def _wait_for(path, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"no {path.name} within {seconds} s"
        time.sleep(0.05)


def test_a_killed_sweep_stops_its_running_point_so_a_rerun_finds_no_orphan(tmp_path):
    job = Job("p0", [*_child(_SAVES_ON_SIGTERM), str(tmp_path / "saved"), str(tmp_path / "up")],
              str(tmp_path / "p0" / "train.log"))
    runner = tmp_path / "runner.py"
    runner.write_text("import pickle\nfrom trex_fast.sweep.launch import run_jobs\n"
                      f"run_jobs(pickle.loads({pickle.dumps([job])!r}), [{{}}], poll_s=0.05)\n")
    sweep = subprocess.Popen([sys.executable, str(runner)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": REPO})
    _wait_for(tmp_path / "up")
    sweep.kill()  # SIGKILL: no handler of the sweep runs
    sweep.wait(timeout=60)
    _wait_for(tmp_path / "saved", 30)  # the point got SIGTERM and saved (it was orphaned)


def test_an_error_in_the_sweep_ends_its_running_points(tmp_path, monkeypatch):
    job = Job("p0", [*_child(_SAVES_ON_SIGTERM), str(tmp_path / "saved"), str(tmp_path / "up")],
              str(tmp_path / "p0" / "train.log"))
    real_sleep, failed = time.sleep, []

    def failing_poll(seconds):  # the sweep's poll fails once the point runs
        if (tmp_path / "up").exists() and not failed:
            failed.append(True)
            raise RuntimeError("the sweep fails while a point runs")
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", failing_poll)
    with pytest.raises(RuntimeError, match="while a point runs"):
        run_jobs([job], [{}], poll_s=0.05)
    assert (tmp_path / "saved").read_text() == "checkpoint"  # SIGTERMed and waited for


def test_slurm_point_job_checkpoint_stops_the_trainer_and_requeues_itself(tmp_path):
    submitit = pytest.importorskip("submitit")
    child = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda s, f: (open(sys.argv[1], "w").write("saved"),
                                                    sys.exit(143)))
        open(sys.argv[2], "w").write("up")
        time.sleep(60)
    """
    job = PointJob("p", [*_child(child), str(tmp_path / "saved"), str(tmp_path / "up")],
                   str(tmp_path))
    job._proc = subprocess.Popen(job.argv)  # as __call__ leaves it while training runs
    deadline = time.time() + 60
    while not (tmp_path / "up").exists() and time.time() < deadline:
        time.sleep(0.05)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.core.utils.DelayedSubmission)
    assert delayed.function is job and job._proc is None
    assert (tmp_path / "saved").read_text() == "saved"
    clone = pickle.loads(pickle.dumps(delayed.function))  # what submitit requeues
    assert clone.argv == job.argv and clone.run_dir == job.run_dir


def test_tensorboard_events_per_run_hold_the_epoch_metrics(tiny_imagefolder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trex_fast.train import run

    out = tmp_path / "tb_run"
    points = build_points(parse_base(tiny_base(tiny_imagefolder)), {}, [], str(tmp_path))
    assert not points[0].cfg.tensorboard  # off by default
    run(make_config(**{**points[0].flags, "output_dir": str(out)}, tensorboard=True))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    (val,) = events.Scalars("val_top1")
    assert val.step == record["step"] == 2
    assert val.value == pytest.approx(record["val_top1"])
    assert "train_loss" in events.Tags()["scalars"]


def test_transfer_rows_are_cached_and_the_figure_uses_log_odds_with_the_papers_points(
        tmp_path, monkeypatch):
    from trex_fast.eval import cli as eval_cli
    from trex_fast.sweep import report as sweep_report

    calls = []

    def fake_transfer(**flags):  # trex_fast.eval.transfer's contract: a JSON line on stdout
        calls.append(flags)
        print("| dataset | top-1 |\n" + json.dumps({"eval": "transfer", "log_odds_mean": 0.5}))

    monkeypatch.setattr(eval_cli, "transfer", fake_transfer)
    points = build_points({"epochs": 1, "warmup_epochs": 0}, parse_grid("clf_tau=0.1,0.2"), [],
                          str(tmp_path))
    for point in points:  # finished runs, as training leaves them
        os.makedirs(point.run_dir)
        (tmp_path / point.name / "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "step": 2, "val_top1": 70.0}) + "\n")
        (tmp_path / point.name / "backbone.pth").write_bytes(b"")
    rows = sweep_report.collect(points, str(tmp_path), transfer="/data/dtd")["rows"]
    assert [r["transfer_log_odds"] for r in rows] == [0.5, 0.5]
    assert calls[0]["cache_dir"] == os.path.join(points[0].run_dir, "transfer_cache")
    sweep_report.collect(points, str(tmp_path), transfer="/data/dtd")
    assert len(calls) == 2  # the rerun read eval_transfer.json
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch.setattr(plt.Axes, "annotate", lambda self, text, *a, **k: drawn.append(text))
    sweep_report.plot_tradeoff(rows, [p.knobs for p in points], str(tmp_path / "f.png"))
    assert drawn == ["clf_tau=0.1", "clf_tau=0.2", "t-ReX (paper)", "t-ReX* (paper)"]


def test_dry_run_prints_each_points_command_and_writes_nothing(tmp_path, capsys):
    from trex_fast.sweep.cli import sweep

    out = tmp_path / "dry"
    result = sweep(grid="global_scale=(0.25,1.0),(0.4,1.0)", base="--epochs=2 --warmup_epochs=0",
                   output_dir=str(out), launcher="torchrun", nproc_per_node=2, dry_run=True)
    assert result["status"] == {"global_scale-0.25-1.0": "pending",
                                "global_scale-0.4-1.0": "pending"}
    printed = capsys.readouterr().out
    assert printed.count("torch.distributed.run --standalone --nproc_per_node=2") == 2
    assert "'--global_scale=(0.4, 1.0)'" in printed and not out.exists()
