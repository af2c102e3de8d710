"""Runs that survive (issue #15): the run plan, resume that refuses what it cannot continue,
checkpoints on a clock, a truncated checkpoint, kill -9 mid-epoch (CPU fp32, reference)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipelines.demo_data import write_dataset
from tests.helpers import REPO, tiny_config
from tests.integration.test_resume import _assert_same_tensors, _metrics
from trex_fast.checkpoint import CheckpointDir, ResumeError, check_resumable, load_checkpoint
from trex_fast.data import count_classes
from trex_fast.distributed import DistInfo
from trex_fast.plan import make_plan, plan_run
from trex_fast.train import run

SINGLE = DistInfo(0, 1, 0, 1)
# 8 classes x 4 train images = 32: 4 steps per epoch at batch 8; metric reads every 3 steps,
# so a clock checkpoint can only land on step 3 of an epoch (global steps 3 and 7).
FLAGS = dict(arch="resnet18", batch_size=8, global_size=32, local_size=16, local_crops=2,
             memory_size=32, pr_hidden_dim=32, pr_bottleneck_dim=8, warmup_epochs=1, epochs=2,
             lr=0.5, device="cpu", channels_last=False, num_workers=0, log_every=3,
             eval_every=1)
EVERY_READ = dict(checkpoint_every_min=1e-9, keep_checkpoints=20)  # due at every metric read


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_in1k")
    write_dataset(str(root), train_per_class=4, val_per_class=2)
    return str(root)


def _config(data, out, **overrides):
    return tiny_config(data=data, output_dir=str(out), **{**FLAGS, **overrides})


@pytest.fixture(scope="module")
def clocked(data, tmp_path_factory):
    """A 2-epoch run that checkpoints at every metric read and keeps them all."""
    out = tmp_path_factory.mktemp("clocked")
    run(_config(data, out, **EVERY_READ))
    return out


def _steps_on_disk(out) -> dict[str, int]:
    return {name: load_checkpoint(str(out / name))["step"] for name in sorted(os.listdir(out))
            if name.startswith("checkpoint")}


def test_the_clock_checkpoints_only_at_metric_reads_and_keeps_the_epoch_end(clocked):
    on_disk = _steps_on_disk(clocked)
    assert on_disk == {"checkpoint-step000000003.pt": 3, "checkpoint-step000000004.pt": 4,
                       "checkpoint-step000000007.pt": 7, "checkpoint.pt": 8}
    mid = load_checkpoint(str(clocked / "checkpoint-step000000007.pt"))
    assert mid["epoch"] == 1 and mid["step_in_epoch"] == 3  # step 3 of epoch 2: a read step
    assert mid["epoch_sums"]["steps"] == 3


def test_clock_off_and_keep_checkpoints(data, clocked, tmp_path):
    """checkpoint_every_min=0: epoch ends only; keep_checkpoints=1: only the newest. The
    clocked run's extra saves changed nothing: same final weights."""
    out = tmp_path / "plain"
    run(_config(data, out, checkpoint_every_min=0, keep_checkpoints=1))
    assert _steps_on_disk(out) == {"checkpoint.pt": 8}
    a, b = load_checkpoint(str(out / "checkpoint.pt")), load_checkpoint(
        str(clocked / "checkpoint.pt"))
    for key in ("online", "ema", "memory", "optimizer"):
        _assert_same_tensors(a[key], b[key], key)


def test_resolved_config_is_the_plan(data, clocked):
    plan, _, _ = plan_run(_config(data, clocked, **EVERY_READ), SINGLE)
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
    run(_config(data, out, **EVERY_READ))  # continues from step 7 to the clocked run's end
    a, b = (load_checkpoint(str(d / "checkpoint.pt")) for d in (out, clocked))
    assert a["step"] == b["step"] == 8
    for key in ("online", "ema", "memory"):
        _assert_same_tensors(a[key], b[key], key)


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
    cfg = _config(data, clocked, **EVERY_READ, **change)
    with pytest.raises(ResumeError, match="cannot resume") as refused:
        check_resumable(ckpt, cfg, _plan(cfg))
    assert named in str(refused.value)
    if next(iter(change)) in ("epochs", "warmup_epochs", "lr", "min_lr"):
        assert "--reschedule=True" in str(refused.value)


def test_resume_refuses_another_world_size_and_says_the_order_reshards(data, clocked):
    ckpt = load_checkpoint(str(clocked / "checkpoint-step000000007.pt"))
    cfg = _config(data, clocked, **{**EVERY_READ, "batch_size": 4})  # same global batch 8
    with pytest.raises(ResumeError) as refused:
        check_resumable(ckpt, cfg, _plan(cfg, DistInfo(0, 2, 0, 2)))
    message = str(refused.value)
    assert "world_size: 1 -> 2" in message and "re-shards exactly" in message
    assert "global_batch" not in message


def test_reschedule_accepts_a_schedule_change_and_reports_the_lr(data, clocked):
    ckpt = load_checkpoint(str(clocked / "checkpoint-step000000007.pt"))
    same = _config(data, clocked, **EVERY_READ)
    assert check_resumable(ckpt, same, _plan(same)) == []  # nothing changed: nothing to say
    cfg = _config(data, clocked, **EVERY_READ, epochs=3)
    lines = check_resumable(ckpt, cfg, _plan(cfg), reschedule=True)
    assert len(lines) == 1 and lines[0].startswith("--reschedule: epochs: 2 -> 3; the LR at "
                                                   "global step 7 goes from ")
    before, after = (float(x) for x in lines[0].split("goes from ")[1].split(" to "))
    assert after > before > 0  # the longer cosine is less far along at step 7
    other = _config(data, clocked, **EVERY_READ, epochs=3, arch="resnet34")
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
    run(_config(data, out, **EVERY_READ))  # resumes at step 7, ends like the clocked run
    assert "checkpoint.pt: cannot be loaded" in capsys.readouterr().out
    a, b = load_checkpoint(str(newest)), load_checkpoint(str(clocked / "checkpoint.pt"))
    assert a["step"] == b["step"] == 8
    for key in ("online", "ema", "memory"):
        _assert_same_tensors(a[key], b[key], key)


def _cli(flags: dict) -> list[str]:
    def text(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return [sys.executable, "-m", "trex_fast.train", "--preset=demo",
            *(f"--{k}={text(v)}" for k, v in flags.items())]


def _torchrun(flags: dict) -> list[str]:
    """The same command under torchrun: 2 CPU processes (gloo)."""
    python, *module = _cli(flags)
    return [python, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *module]


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if entry.isdigit() and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def kill_9_at_first_checkpoint(flags: dict, out, launch=_cli) -> dict:
    """Start `python -m trex_fast.train` (or launch(flags)) with flags, kill -9 its process
    group as soon as a checkpoint exists; returns that checkpoint."""
    # the same CPU thread count as this process (importing ffcv sets it to 1 here), so that
    # fp32 sums are ordered alike in the killed run and in its in-process rerun
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(launch({**flags, "output_dir": str(out)}), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    # torchrun starts each worker in a session of its own: kill those groups too, as a lost
    # node would. No handler runs: whatever was being written is cut.
    for pid in (*_children(proc.pid), proc.pid):
        os.killpg(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return load_checkpoint(str(out / "checkpoint.pt"))


def assert_same_run(out, whole, epochs: int) -> None:
    """Same final weights (1e-6) and the same per-epoch metrics as the run in `whole`."""
    a, b = load_checkpoint(str(out / "checkpoint.pt")), load_checkpoint(
        str(whole / "checkpoint.pt"))
    assert a["step"] == b["step"]
    for key in ("online", "ema", "memory", "optimizer"):
        _assert_same_tensors(a[key], b[key], key)
    mine, theirs = _metrics(out), _metrics(whole)
    assert [r["epoch"] for r in mine] == [r["epoch"] for r in theirs] == list(range(1, epochs + 1))
    for r, s in zip(mine, theirs):
        for key in ("val_top1", "val_loss", "train_loss", "train_top1"):
            assert r[key] == pytest.approx(s[key], abs=1e-5), (r["epoch"], key)


def test_kill_9_mid_epoch_then_rerun_ends_like_an_uninterrupted_run(data, clocked, tmp_path):
    out = tmp_path / "killed"
    first = kill_9_at_first_checkpoint({**FLAGS, **EVERY_READ, "data": data}, out)
    assert first["step"] < 8, "the run finished before it was killed"
    run(_config(data, out, **EVERY_READ))  # the same command again
    assert_same_run(out, clocked, epochs=2)
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".staged"))]  # cleaned up


# batch 4 per process x 2 = the global batch of FLAGS: 4 steps per epoch, clock checkpoints at
# step 3 of each epoch
TWO_RANKS = {**FLAGS, **EVERY_READ, "batch_size": 4}


def _torchrun_to_the_end(flags: dict, out) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(_torchrun({**flags, "output_dir": str(out)}), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks_whole(data, tmp_path_factory):
    """The uninterrupted 2-rank run the interrupted ones must end like."""
    whole = tmp_path_factory.mktemp("two_ranks_whole")
    _torchrun_to_the_end({**TWO_RANKS, "data": data}, whole)
    return whole


@pytest.mark.slow
def test_kill_9_mid_epoch_under_two_ranks_then_rerun_ends_like_an_uninterrupted_run(
        data, two_ranks_whole, tmp_path):
    """Each rank has its own BatchNorm statistics (no SyncBN on gloo), RNG states and metric
    sums; the checkpoint holds every rank's, and each rank resumes its own."""
    whole, out = two_ranks_whole, tmp_path / "killed"
    first = kill_9_at_first_checkpoint({**TWO_RANKS, "data": data}, out, launch=_torchrun)
    assert first["step"] == 3 and first["step_in_epoch"] == 3, "not killed mid-epoch"
    ranks = first["ranks"]
    assert len(ranks) == 2 and ranks[1]["epoch_sums"]["steps"] == 3
    running_mean = "backbone.bn1.running_mean"
    assert running_mean in ranks[0]["buffers"]["online"]
    # the ranks saw different images: what a resume from rank 0's state alone would lose
    assert not torch.equal(ranks[0]["buffers"]["online"][running_mean],
                           ranks[1]["buffers"]["online"][running_mean])
    _torchrun_to_the_end({**TWO_RANKS, "data": data}, out)  # the same command again
    assert_same_run(out, whole, epochs=2)
    # rank 1's BatchNorm statistics too (rank 0's are the checkpoint's "online" and "ema"). The
    # RNG states are not compared: each DataLoader iterator draws a seed from the torch RNG,
    # and the rerun makes one more (for the rest of the killed epoch); it uses no other draw.
    a, b = (load_checkpoint(str(d / "checkpoint.pt"))["ranks"] for d in (out, whole))
    _assert_same_tensors(a[1]["buffers"], b[1]["buffers"], "rank 1 buffers")


def _catches_sigterm(pid: int) -> bool:
    """Has the process installed a SIGTERM handler yet (SigCgt in /proc/<pid>/status)?"""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def _rank_of(pid: int) -> int | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"]) if b"RANK" in env else None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly(data, two_ranks_whole,
                                                                         tmp_path):
    """A signal that reaches rank 1 only (or the ranks at different steps): both ranks stop at
    the next metric read, the checkpoint holds both ranks' states, and the rerun ends like the
    uninterrupted run. No clock checkpoint: the stop's is the only one."""
    out = tmp_path / "stopped"
    flags = {**TWO_RANKS, "data": data, "checkpoint_every_min": 0, "output_dir": str(out)}
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(_torchrun(flags), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, rank1 = time.monotonic() + 120, None
        while rank1 is None or not _catches_sigterm(rank1):
            assert time.monotonic() < deadline and proc.poll() is None, "no rank 1 handler"
            time.sleep(0.05)
            rank1 = next((pid for pid in _children(proc.pid) if _rank_of(pid) == 1), None)
        os.kill(rank1, signal.SIGTERM)  # rank 1 only
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, output[-3000:]  # preempted: the job is not done
    assert "stopped at global step 3" in output, output[-3000:]  # rank 0 reports the stop
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert (ckpt["step"], ckpt["step_in_epoch"]) == (3, 3), "not at the first metric read"
    assert [r["epoch_sums"]["steps"] for r in ckpt["ranks"]] == [3, 3]  # both ranks' states
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-step")]
    _torchrun_to_the_end({**TWO_RANKS, "data": data}, out)  # the same command again
    assert_same_run(out, two_ranks_whole, epochs=2)


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
