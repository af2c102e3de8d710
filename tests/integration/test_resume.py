"""Resume equivalence: k steps, stop, resume, k more == 2k uninterrupted (fp32, CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipelines.demo_data import write_dataset
from tests.helpers import REPO, tiny_config
from trex_fast.checkpoint import ResumeError, load_checkpoint
from trex_fast.loop import NonFiniteLossError
from trex_fast.train import run


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_in1k")
    write_dataset(str(root), train_per_class=4, val_per_class=2)  # 8 classes: 32 + 16 images
    return str(root)


def _config(data, out, **overrides):
    flags = dict(batch_size=8, memory_size=32, num_workers=0, log_every=2, eval_every=1,
                 warmup_epochs=1)
    return tiny_config(data=data, output_dir=str(out), **{**flags, **overrides})


def _assert_same_tensors(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.double(), b.double(), atol=1e-6, rtol=0), where


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_stop_and_resume_equals_an_uninterrupted_run(tiny_imagefolder, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run(_config(tiny_imagefolder, full))  # 2 epochs x 4 steps
    stopped = run(_config(tiny_imagefolder, split, stop_at_step=3))  # stops mid-epoch 1
    assert stopped["stopped_at_step"] == 3
    assert load_checkpoint(str(split / "checkpoint.pt"))["step_in_epoch"] == 3
    run(_config(tiny_imagefolder, split))  # same output_dir: resumes at step 3

    a = load_checkpoint(str(full / "checkpoint.pt"))
    b = load_checkpoint(str(split / "checkpoint.pt"))
    assert a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] == 2
    for key in ("online", "ema", "memory", "optimizer"):
        _assert_same_tensors(a[key], b[key], key)
    last_full, last_split = _metrics(full)[-1], _metrics(split)[-1]
    assert last_full["epoch"] == last_split["epoch"] == 2
    for key in ("train_loss", "train_top1", "val_top1", "val_loss"):
        assert last_full[key] == pytest.approx(last_split[key], abs=1e-6), key


def test_finished_run_outputs_and_raising_epochs_needs_reschedule(tiny_imagefolder, tmp_path,
                                                                  capsys):
    out = tmp_path / "run"
    run(_config(tiny_imagefolder, out, epochs=1, warmup_epochs=0))
    for name in ("config.json", "env.json", "metrics.jsonl", "loss.png", "accuracy.png",
                 "checkpoint.pt", "backbone.pth"):
        assert (out / name).is_file(), name
    record = _metrics(out)[0]
    for key in ("epoch", "step", "train_loss", "train_top1", "val_top1", "samples_per_s", "lr",
                "elapsed_s"):
        assert key in record, key
    env = json.loads((out / "env.json").read_text())
    assert env["libraries"]["torch"] and env["device_name"] and env["git_revision"]
    with pytest.raises(ResumeError, match=r"epochs: 1 -> 2: a schedule change, the LR at global "
                                          r"step 4 goes from 1e-06 to 0\.0\d+ .*--reschedule"):
        run(_config(tiny_imagefolder, out, epochs=2, warmup_epochs=0))
    capsys.readouterr()
    run(_config(tiny_imagefolder, out, epochs=2, warmup_epochs=0, reschedule=True))
    assert "--reschedule: epochs: 1 -> 2; the LR at global step 4 goes from 1e-06 to" in (
        capsys.readouterr().out)
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 8


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
        tiny_imagefolder, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    run(_config(tiny_imagefolder, out, stop_at_step=2))
    good = (out / "checkpoint.pt").read_bytes()

    import pipelines.batch

    def poisoned(images, device, dtype, channels_last):
        return torch.full(images.shape, float("nan"), dtype=dtype)

    monkeypatch.setattr(pipelines.batch, "normalize_uint8", poisoned)
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite .* the last checkpoint \(.*checkpoint.pt\) is intact"):
        run(_config(tiny_imagefolder, out))
    assert (out / "checkpoint.pt").read_bytes() == good


def test_sigterm_saves_a_checkpoint_that_resumes_mid_epoch(tiny_imagefolder, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "trex_fast.train", f"--data={tiny_imagefolder}",
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


def test_profile_steps_reports_a_verdict_and_trains_nothing(tiny_imagefolder, tmp_path):
    out = tmp_path / "profile"
    report = run(_config(tiny_imagefolder, out, batch_size=4, profile_steps=2, memory_size=16))
    assert report["pipeline"] == "reference" and report["steps"] == 2
    for key in ("real_samples_per_s", "synthetic_samples_per_s", "loader_samples_per_s"):
        assert report[key] > 0, key
    ratio = report["real_samples_per_s"] / report["synthetic_samples_per_s"]
    assert report["verdict"].startswith("compute-bound" if ratio >= 0.95 else "data-bound")
    assert json.loads((out / "bottleneck.json").read_text())["verdict"] == report["verdict"]
    assert not (out / "checkpoint.pt").exists()  # a dry run: nothing trained is kept
