"""Resume equivalence: k steps, stop, resume, k more == 2k uninterrupted (fp32, CPU, against the
session's shared run); a finished run's outputs; the non-finite stop; SIGTERM; profile_steps."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests._runs import EVERY_READ, assert_same_run, metrics, run_config, steps_on_disk
from tests.helpers import REPO
from trex_fast.checkpoint import ResumeError, load_checkpoint
from trex_fast.loop import NonFiniteLossError
from trex_fast.train import run


def test_stop_and_resume_equals_an_uninterrupted_run(shared_run, tmp_path):
    """Stopped mid-epoch and resumed with the clock off (checkpoint_every_min=0: the stop and
    epoch ends only) and keep_checkpoints=1 (only the newest), the run ends like the shared
    run, which saved at every metric read: the stop, the resume and the clock's extra saves
    change nothing."""
    out, plain = tmp_path / "split", dict(checkpoint_every_min=0, keep_checkpoints=1)
    stopped = run(run_config(shared_run.data, out, stop_at_step=3, **plain))  # mid-epoch 1
    assert stopped["stopped_at_step"] == 3
    assert load_checkpoint(str(out / "checkpoint.pt"))["step_in_epoch"] == 3
    run(run_config(shared_run.data, out, **plain))  # same output_dir: resumes at step 3
    assert steps_on_disk(out) == {"checkpoint.pt": 8}
    a = load_checkpoint(str(out / "checkpoint.pt"))
    assert a["step"] == 8 and a["epoch"] == 2
    assert_same_run(out, shared_run.out, epochs=2)
    last_split, last_full = metrics(out)[-1], metrics(shared_run.out)[-1]
    for key in ("train_loss", "train_top1", "val_top1", "val_loss"):
        assert last_split[key] == pytest.approx(last_full[key], abs=1e-6), key


def test_finished_run_outputs_and_raising_epochs_needs_reschedule(shared_run, tmp_path,
                                                                  capsys):
    for name in ("config.json", "env.json", "metrics.jsonl", "loss.png", "accuracy.png",
                 "checkpoint.pt", "backbone.pth"):
        assert (shared_run.out / name).is_file(), name
    record = metrics(shared_run.out)[0]
    for key in ("epoch", "step", "train_loss", "train_top1", "val_top1", "samples_per_s", "lr",
                "elapsed_s"):
        assert key in record, key
    env = json.loads((shared_run.out / "env.json").read_text())
    assert env["libraries"]["torch"] and env["device_name"] and env["git_revision"]
    out = tmp_path / "run"  # a copy: the shared run stays as it is
    shutil.copytree(shared_run.out, out)
    with pytest.raises(ResumeError, match=r"epochs: 2 -> 3: a schedule change, the LR at global "
                                          r"step 8 goes from 1e-06 to 0\.0\d+ .*--reschedule"):
        run(run_config(shared_run.data, out, **EVERY_READ, epochs=3))
    capsys.readouterr()
    run(run_config(shared_run.data, out, **EVERY_READ, epochs=3, reschedule=True))
    assert "--reschedule: epochs: 2 -> 3; the LR at global step 8 goes from 1e-06 to" in (
        capsys.readouterr().out)
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["step"] == 12


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
        demo_data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    run(run_config(demo_data, out, stop_at_step=2))
    good = (out / "checkpoint.pt").read_bytes()

    import pipelines.batch

    def poisoned(images, device, dtype, channels_last):
        return torch.full(images.shape, float("nan"), dtype=dtype)

    monkeypatch.setattr(pipelines.batch, "normalize_uint8", poisoned)
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite .* the last checkpoint \(.*checkpoint.pt\) is intact"):
        run(run_config(demo_data, out))
    assert (out / "checkpoint.pt").read_bytes() == good


def test_sigterm_saves_a_checkpoint_that_resumes_mid_epoch(demo_data, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "trex_fast.train", f"--data={demo_data}",
           f"--output_dir={out}", "--arch=resnet18", "--batch_size=8", "--global_size=32",
           "--local_size=16", "--local_crops=2", "--memory_size=32", "--pr_hidden_dim=32",
           "--num_workers=1", "--epochs=1000", "--device=cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)
    for line in proc.stdout:  # wait until training has started
        if "outputs in" in line:
            break
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the loader workers get it too
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "got SIGTERM" in rest and "stopped at global step" in rest
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] >= 1 and ckpt["step"] == ckpt["epoch"] * 4 + ckpt["step_in_epoch"]


def test_profile_steps_reports_a_verdict_and_trains_nothing(demo_data, tmp_path):
    out = tmp_path / "profile"
    report = run(run_config(demo_data, out, batch_size=4, profile_steps=2, memory_size=16))
    assert report["pipeline"] == "reference" and report["steps"] == 2
    for key in ("real_samples_per_s", "synthetic_samples_per_s", "loader_samples_per_s"):
        assert report[key] > 0, key
    ratio = report["real_samples_per_s"] / report["synthetic_samples_per_s"]
    assert report["verdict"].startswith("compute-bound" if ratio >= 0.95 else "data-bound")
    assert json.loads((out / "bottleneck.json").read_text())["verdict"] == report["verdict"]
    assert not (out / "checkpoint.pt").exists()  # a dry run: nothing trained is kept
