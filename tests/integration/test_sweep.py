"""The sweep (issue #17) with real processes: the slurm launcher (submitit local) trains a
point, the local launcher's GPU slots and signals with stand-in commands, and TensorBoard
events of a run (the shared run's). The 2 x 2 sweep is in tests/e2e, and so is the torchrun
launcher (it launches tests/e2e/test_survive.py's two-rank run); validation in tests/unit."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests._runs import metrics, sweep_base, sweep_cli
from tests.helpers import REPO
from trex_fast.config import make_config
from trex_fast.sweep.launch import Job, LaunchSettings, PointJob, gpu_slots, run_jobs
from trex_fast.sweep.points import SweepError


def test_slurm_launcher_through_submitits_local_executor_is_collected(demo_data,
                                                                       tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "slurm"
    proc = sweep_cli("--grid=clf_tau=0.2", f"--base={sweep_base(demo_data)} --memory_size=32",
                  f"--output_dir={out}", "--launcher=slurm", "--cluster=local",
                  "--gpus_per_node=0", "--time_min=10")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted clf_tau-0.2: job" in proc.stdout
    job_id = (out / "clf_tau-0.2" / "job_id").read_text().strip()
    assert list((out / "submitit").glob(f"{job_id}*"))  # submitit's own job folder
    rows = json.loads((out / "summary.json").read_text())
    assert rows[0]["status"] == "finished" and rows[0]["clf_tau"] == 0.2
    assert rows[0]["in1k_top1"] is not None and (out / "trade_off.png").is_file()


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


def test_tensorboard_events_per_run_hold_the_epoch_metrics(shared_run):
    """The shared run was trained with --tensorboard=True (off by default)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert not make_config("demo").tensorboard
    events = EventAccumulator(str(shared_run.out / "tensorboard"))
    events.Reload()
    records = metrics(shared_run.out)
    val = events.Scalars("val_top1")
    assert [v.step for v in val] == [r["step"] for r in records] == [4, 8]
    assert [v.value for v in val] == pytest.approx([r["val_top1"] for r in records])
    assert "train_loss" in events.Tags()["scalars"]


