"""Runs that survive, end to end (issue #15): kill -9 mid-epoch then the same command again
ends like the uninterrupted run (reference pipeline, one process; and under torchrun, two CPU
ranks on gloo), SIGTERM to one rank, and what a two-rank run trains, validates and saves
(launched by the sweep's torchrun launcher)."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests._runs import (
    EVERY_READ,
    FLAGS,
    assert_same_run,
    assert_same_tensors,
    children,
    kill_9_at_first_checkpoint,
    run_config,
    same_threads_env,
    sweep_cli,
    torchrun_cli,
)
from tests.helpers import REPO
from trex_fast.checkpoint import load_checkpoint
from trex_fast.train import run


def test_kill_9_mid_epoch_then_rerun_ends_like_an_uninterrupted_run(shared_run, tmp_path):
    out = tmp_path / "killed"
    first = kill_9_at_first_checkpoint({**FLAGS, **EVERY_READ, "data": shared_run.data}, out)
    assert first["step"] < 8, "the run finished before it was killed"
    run(run_config(shared_run.data, out, **EVERY_READ))  # the same command again
    assert_same_run(out, shared_run.out, epochs=2)
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".staged"))]  # cleaned up


# batch 4 per process x 2 = the global batch of FLAGS: 4 steps per epoch, clock checkpoints at
# step 3 of each epoch
TWO_RANKS = {**FLAGS, **EVERY_READ, "batch_size": 4}


def _torchrun_to_the_end(flags: dict, out) -> None:
    proc = subprocess.run(torchrun_cli({**flags, "output_dir": str(out)}), cwd=REPO,
                          env=same_threads_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks_whole(demo_data, tmp_path_factory):
    """The uninterrupted 2-rank run the interrupted ones must end like, launched as a one-point
    sweep (seed=0, the default) by the sweep's torchrun launcher."""
    out = tmp_path_factory.mktemp("two_ranks_sweep")
    base = " ".join(f"--{k}={v}" for k, v in {**TWO_RANKS, "data": demo_data}.items())
    proc = sweep_cli("--grid=seed=0", f"--base=--preset=demo {base}", f"--output_dir={out}",
                     "--launcher=torchrun", "--nproc_per_node=2", env=same_threads_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())[0]["status"] == "finished"
    return out / "seed-0"


def test_two_ranks_train_validate_on_disjoint_shards_and_save(two_ranks_whole):
    """The CLI under torchrun (the sweep's launcher): 2 CPU processes (gloo) train the global
    batch together, count each val image once across the two shards, and save the checkpoint
    and backbone."""
    records = [json.loads(line) for line in
               (two_ranks_whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_images"] for r in records] == [16, 16]  # 8 classes x 2, each counted once
    assert records[-1]["step"] == 8  # 2 epochs x 32 images / (4 per process x 2 processes)
    config = json.loads((two_ranks_whole / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["global_batch"] == 8
    assert (two_ranks_whole / "backbone.pth").is_file()
    assert (two_ranks_whole / "checkpoint.pt").is_file()
    final = json.loads((two_ranks_whole / "final.json").read_text())  # issue #25: rank 0 wrote
    assert final["in1k_head_images"] == 16 and final["in1k_head_on_original_val"] is True
    assert final["in1k_head_top1_fp32"] == records[-1]["val_top1"]  # fp32 on the CPU: one pass
    assert "IN1K at the end of the run" in (two_ranks_whole / "train.log").read_text()


@pytest.mark.slow
def test_kill_9_mid_epoch_under_two_ranks_then_rerun_ends_like_an_uninterrupted_run(
        demo_data, two_ranks_whole, tmp_path):
    """Each rank has its own BatchNorm statistics (no SyncBN on gloo), RNG states and metric
    sums; the checkpoint holds every rank's, and each rank resumes its own."""
    whole, out = two_ranks_whole, tmp_path / "killed"
    first = kill_9_at_first_checkpoint({**TWO_RANKS, "data": demo_data}, out, launch=torchrun_cli)
    assert first["step"] == 3 and first["step_in_epoch"] == 3, "not killed mid-epoch"
    ranks = first["ranks"]
    assert len(ranks) == 2 and ranks[1]["epoch_sums"]["steps"] == 3
    running_mean = "backbone.bn1.running_mean"
    assert running_mean in ranks[0]["buffers"]["online"]
    # the ranks saw different images: what a resume from rank 0's state alone would lose
    assert not torch.equal(ranks[0]["buffers"]["online"][running_mean],
                           ranks[1]["buffers"]["online"][running_mean])
    _torchrun_to_the_end({**TWO_RANKS, "data": demo_data}, out)  # the same command again
    assert_same_run(out, whole, epochs=2)
    # rank 1's BatchNorm statistics too (rank 0's are the checkpoint's "online" and "ema"). The
    # RNG states are not compared: each DataLoader iterator draws a seed from the torch RNG,
    # and the rerun makes one more (for the rest of the killed epoch); it uses no other draw.
    a, b = (load_checkpoint(str(d / "checkpoint.pt"))["ranks"] for d in (out, whole))
    assert_same_tensors(a[1]["buffers"], b[1]["buffers"], "rank 1 buffers")


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
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly(demo_data, two_ranks_whole,
                                                                         tmp_path):
    """A signal that reaches rank 1 only (or the ranks at different steps): both ranks stop at
    the next metric read, the checkpoint holds both ranks' states, and the rerun ends like the
    uninterrupted run. No clock checkpoint: the stop's is the only one."""
    out = tmp_path / "stopped"
    flags = {**TWO_RANKS, "data": demo_data, "checkpoint_every_min": 0, "output_dir": str(out)}
    proc = subprocess.Popen(torchrun_cli(flags), cwd=REPO, env=same_threads_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline, rank1 = time.monotonic() + 120, None
        while rank1 is None or not _catches_sigterm(rank1):
            assert time.monotonic() < deadline and proc.poll() is None, "no rank 1 handler"
            time.sleep(0.05)
            rank1 = next((pid for pid in children(proc.pid) if _rank_of(pid) == 1), None)
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
    _torchrun_to_the_end({**TWO_RANKS, "data": demo_data}, out)  # the same command again
    assert_same_run(out, two_ranks_whole, epochs=2)


