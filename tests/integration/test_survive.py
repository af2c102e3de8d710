"""Runs that survive (issue #15): the run plan, resume that refuses what it cannot continue,
checkpoints on a clock, a truncated checkpoint (CPU fp32, reference). They read the session's
shared run (tests/_runs.py); kill -9 and the two-rank runs are in tests/e2e/test_survive.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests._runs import EVERY_READ, assert_same_tensors, run_config, steps_on_disk
from tests.helpers import REPO
from trex_fast.checkpoint import CheckpointDir, ResumeError, check_resumable, load_checkpoint
from trex_fast.data import count_classes
from trex_fast.distributed import DistInfo
from trex_fast.plan import make_plan, plan_run
from trex_fast.train import run

SINGLE = DistInfo(0, 1, 0, 1)


@pytest.fixture
def data(shared_run):
    return shared_run.data


@pytest.fixture
def clocked(shared_run):
    """The shared 2-epoch run that checkpoints at every metric read and keeps them all."""
    return shared_run.out


def test_the_clock_checkpoints_only_at_metric_reads_and_keeps_the_epoch_end(clocked):
    on_disk = steps_on_disk(clocked)
    assert on_disk == {"checkpoint-step000000003.pt": 3, "checkpoint-step000000004.pt": 4,
                       "checkpoint-step000000007.pt": 7, "checkpoint.pt": 8}
    mid = load_checkpoint(str(clocked / "checkpoint-step000000007.pt"))
    assert mid["epoch"] == 1 and mid["step_in_epoch"] == 3  # step 3 of epoch 2: a read step
    assert mid["epoch_sums"]["steps"] == 3


def test_resolved_config_is_the_plan(data, clocked):
    plan, _, _ = plan_run(run_config(data, clocked, **EVERY_READ), SINGLE)
    resolved = json.loads((clocked / "config.json").read_text())["resolved"]
    assert resolved == json.loads(json.dumps(plan.to_dict()))
    assert load_checkpoint(str(clocked / "checkpoint.pt"))["plan"] == plan.to_dict()
    assert (plan.device, plan.precision, plan.loss_impl, plan.stage_impl, plan.pipeline) == (
        "cpu", "fp32", "torch", "torch", "reference")
    assert resolved["stage_impl"] == "torch"
    assert (plan.global_batch, plan.steps_per_epoch, plan.total_steps, plan.num_classes,
            plan.warmup_steps) == (8, 4, 8, 8, 4)
    settings = plan.loader_settings()
    assert (settings.batch_size, settings.num_workers, settings.world_size) == (8, 0, 1)


def test_the_class_count_has_one_home(data, tmp_path):
    """Class folders for an ImageFolder root (an empty class counts: labels index the list),
    meta.json's class list for converted data, and a clear error where it is missing."""
    assert count_classes(data, "reference") == 8
    (tmp_path / "train" / "n_empty").mkdir(parents=True)
    (tmp_path / "train" / "n_other").mkdir()
    (tmp_path / "val").mkdir()
    assert count_classes(str(tmp_path), "reference") == 2
    with pytest.raises(FileNotFoundError, match="has no meta.json: --pipeline=ffcv reads data "
                       "converted by tools/convert_in1k.py"):
        count_classes(str(tmp_path), "ffcv")
    (tmp_path / "meta.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    assert count_classes(str(tmp_path), "ffcv") == count_classes(str(tmp_path), "dali") == 3


def test_a_checkpoint_from_before_the_role_names_still_resumes(data, clocked, tmp_path):
    """Older checkpoints stored the online network as "core" and the class count at the top."""
    out = tmp_path / "older"
    shutil.copytree(clocked, out, ignore=lambda d, names: [n for n in names if n.startswith(
        "checkpoint") and n != "checkpoint-step000000007.pt"])
    older = torch.load(out / "checkpoint-step000000007.pt", weights_only=True)
    older["core"] = older.pop("online")
    older["num_classes"] = older.pop("plan")["num_classes"]
    torch.save(older, out / "checkpoint.pt")
    os.remove(out / "checkpoint-step000000007.pt")
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert "online" in ckpt and ckpt["plan"] == {"num_classes": 8}
    run(run_config(data, out, **EVERY_READ))  # continues from step 7 to the clocked run's end
    a, b = (load_checkpoint(str(d / "checkpoint.pt")) for d in (out, clocked))
    assert a["step"] == b["step"] == 8
    for key in ("online", "ema", "memory"):
        assert_same_tensors(a[key], b[key], key)


REFUSED = [  # (flags changed on resume, what the message must name)
    *[(dict([kv]), f"{kv[0]}: ") for kv in dict(
        arch="resnet34", pr_hidden_layers=1, pr_hidden_dim=64, pr_bottleneck_dim=16,
        pr_input_l2_norm=False, memory_size=64, clf_tau=0.2, ema_momentum=0.99,
        weight_decay=0.0, momentum=0.8, seed=1, global_crops=2, local_crops=1, global_size=48,
        local_size=24, global_scale=(0.3, 1.0), local_scale=(0.1, 0.3)).items()],
    (dict(precision="bf16"), "precision: 'fp32' -> 'bf16'"),
    (dict(batch_size=4), "global_batch: 8 -> 4"),
    (dict(epochs=3), "epochs: 2 -> 3: a schedule change, the LR at global step 7"),
    (dict(warmup_epochs=0.5), "warmup_epochs: 1.0 -> 0.5"),
    (dict(lr=0.25), "lr: 0.5 -> 0.25"),
    (dict(min_lr=1e-5), "min_lr: 1e-06 -> 1e-05"),
]


def _plan(cfg, dist_info=SINGLE):
    return make_plan(cfg, dist_info, num_classes=8,
                     steps_per_epoch=32 // (cfg.batch_size * dist_info.world_size))


@pytest.mark.parametrize("change,named", REFUSED, ids=[next(iter(c)) for c, _ in REFUSED])
def test_resume_refuses_a_change_naming_it(data, clocked, change, named):
    ckpt = load_checkpoint(str(clocked / "checkpoint-step000000007.pt"))
    cfg = run_config(data, clocked, **EVERY_READ, **change)
    with pytest.raises(ResumeError, match="cannot resume") as refused:
        check_resumable(ckpt, cfg, _plan(cfg))
    assert named in str(refused.value)
    if next(iter(change)) in ("epochs", "warmup_epochs", "lr", "min_lr"):
        assert "--reschedule=True" in str(refused.value)


def test_resume_refuses_another_world_size_and_says_the_order_reshards(data, clocked):
    ckpt = load_checkpoint(str(clocked / "checkpoint-step000000007.pt"))
    cfg = run_config(data, clocked, **{**EVERY_READ, "batch_size": 4})  # same global batch 8
    with pytest.raises(ResumeError) as refused:
        check_resumable(ckpt, cfg, _plan(cfg, DistInfo(0, 2, 0, 2)))
    message = str(refused.value)
    assert "world_size: 1 -> 2" in message and "re-shards exactly" in message
    assert "global_batch" not in message


def test_reschedule_accepts_a_schedule_change_and_reports_the_lr(data, clocked):
    ckpt = load_checkpoint(str(clocked / "checkpoint-step000000007.pt"))
    same = run_config(data, clocked, **EVERY_READ)
    assert check_resumable(ckpt, same, _plan(same)) == []  # nothing changed: nothing to say
    cfg = run_config(data, clocked, **EVERY_READ, epochs=3)
    lines = check_resumable(ckpt, cfg, _plan(cfg), reschedule=True)
    assert len(lines) == 1 and lines[0].startswith("--reschedule: epochs: 2 -> 3; the LR at "
                                                   "global step 7 goes from ")
    before, after = (float(x) for x in lines[0].split("goes from ")[1].split(" to "))
    assert after > before > 0  # the longer cosine is less far along at step 7
    other = run_config(data, clocked, **EVERY_READ, epochs=3, arch="resnet34")
    with pytest.raises(ResumeError, match="arch: 'resnet18' -> 'resnet34'"):
        check_resumable(ckpt, other, _plan(other), reschedule=True)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(data, clocked, tmp_path,
                                                                   capsys):
    out = tmp_path / "truncated"
    shutil.copytree(clocked, out)
    newest = out / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    messages = []
    path, ckpt = CheckpointDir(str(out), 20).load_latest(log=messages.append)
    assert path.endswith("checkpoint-step000000007.pt") and ckpt["step"] == 7
    assert len(messages) == 1 and "checkpoint.pt: cannot be loaded" in messages[0]
    run(run_config(data, out, **EVERY_READ))  # resumes at step 7, ends like the clocked run
    assert "checkpoint.pt: cannot be loaded" in capsys.readouterr().out
    a, b = load_checkpoint(str(newest)), load_checkpoint(str(clocked / "checkpoint.pt"))
    assert a["step"] == b["step"] == 8
    for key in ("online", "ema", "memory"):
        assert_same_tensors(a[key], b[key], key)


def test_missing_data_exits_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trex_fast.train", "--data=/nonexistent",
                             f"--output_dir={tmp_path}"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trex_fast.train: error: --data='/nonexistent': no such directory"], result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_cuda_exits_with_one_line(data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "trex_fast.train", f"--data={data}",
                             "--device=cuda", f"--output_dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trex_fast.train: error: --device='cuda' but no CUDA device is available"], result.stderr
