"""The session's shared tiny data and its one shared training run, and the checks that compare
runs (used by tests/integration and tests/e2e; docs/TESTS.md says who reads what).

The shared run is read-only: a test that resumes, truncates or rewrites it copies it to its own
tmp_path first."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from pipelines.demo_data import write_dataset
from tests.helpers import REPO, tiny_config
from trex_fast.checkpoint import load_checkpoint
from trex_fast.train import run

# 8 classes x 4 train images = 32: 4 steps per epoch at batch 8; metric reads every 3 steps,
# so a clock checkpoint can only land on step 3 of an epoch (global steps 3 and 7).
FLAGS = dict(arch="resnet18", batch_size=8, global_size=32, local_size=16, local_crops=2,
             memory_size=32, pr_hidden_dim=32, pr_bottleneck_dim=8, warmup_epochs=1, epochs=2,
             lr=0.5, device="cpu", channels_last=False, num_workers=0, log_every=3,
             eval_every=1)
EVERY_READ = dict(checkpoint_every_min=1e-9, keep_checkpoints=20)  # due at every metric read
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2


def run_config(data, out, **overrides):
    """The shared run's config (FLAGS) on data into out, with overrides."""
    return tiny_config(data=str(data), output_dir=str(out), **{**FLAGS, **overrides})


class SharedRun(NamedTuple):
    """root/data: the demo ImageFolder; root/run: FLAGS + EVERY_READ trained to the end."""
    root: Path
    result: dict

    @property
    def data(self) -> str:
        return str(self.root / "data")

    @property
    def out(self) -> Path:
        return self.root / "run"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """The tiny demo ImageFolder: 8 classes, 4 train + 2 val images each (32 + 16)."""
    root = tmp_path_factory.mktemp("demo") / "data"
    write_dataset(str(root), train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS)
    return str(root)


@pytest.fixture(scope="session")
def shared_run(demo_data) -> SharedRun:
    """A 2-epoch run (8 steps) on demo_data that checkpoints at every metric read and keeps
    them all (steps 3, 4, 7 and checkpoint.pt at 8): config, env, metrics, figures, backbone,
    and TensorBoard events where tensorboard is installed (no flag a resume compares)."""
    root = Path(demo_data).parent
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    result = run(run_config(demo_data, root / "run", **EVERY_READ, tensorboard=tensorboard))
    return SharedRun(root, result)


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def steps_on_disk(out) -> dict[str, int]:
    """{checkpoint file name: its global step} in out."""
    return {name: load_checkpoint(str(out / name))["step"] for name in sorted(os.listdir(out))
            if name.startswith("checkpoint")}


def assert_same_tensors(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.double(), b.double(), atol=1e-6, rtol=0), where


def assert_same_run(out, whole, epochs: int) -> None:
    """Same final weights (1e-6) and the same per-epoch metrics as the run in `whole`."""
    a, b = load_checkpoint(str(out / "checkpoint.pt")), load_checkpoint(
        str(whole / "checkpoint.pt"))
    assert a["step"] == b["step"]
    for key in ("online", "ema", "memory", "optimizer"):
        assert_same_tensors(a[key], b[key], key)
    mine, theirs = metrics(out), metrics(whole)
    assert [r["epoch"] for r in mine] == [r["epoch"] for r in theirs] == list(range(1, epochs + 1))
    for r, s in zip(mine, theirs):
        for key in ("val_top1", "val_loss", "train_loss", "train_top1"):
            assert r[key] == pytest.approx(s[key], abs=1e-5), (r["epoch"], key)


def train_cli(flags: dict) -> list[str]:
    """`python -m trex_fast.train --preset=demo` with flags."""
    def text(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return [sys.executable, "-m", "trex_fast.train", "--preset=demo",
            *(f"--{k}={text(v)}" for k, v in flags.items())]


def torchrun_cli(flags: dict) -> list[str]:
    """The same command under torchrun: 2 CPU processes (gloo)."""
    python, *module = train_cli(flags)
    return [python, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *module]


def children(pid: int) -> list[int]:
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


def same_threads_env() -> dict:
    """The same CPU thread count as this process (importing ffcv sets it to 1 here), so that
    fp32 sums are ordered alike in a child run and in its in-process twin."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def kill_9_at_first_checkpoint(flags: dict, out, launch=train_cli) -> dict:
    """Start `python -m trex_fast.train` (or launch(flags)) with flags, kill -9 its process
    group as soon as a checkpoint exists; returns that checkpoint."""
    proc = subprocess.Popen(launch({**flags, "output_dir": str(out)}), cwd=REPO,
                            env=same_threads_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    # torchrun starts each worker in a session of its own: kill those groups too, as a lost
    # node would. No handler runs: whatever was being written is cut.
    for pid in (*children(proc.pid), proc.pid):
        os.killpg(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return load_checkpoint(str(out / "checkpoint.pt"))


def sweep_base(data: str) -> str:
    """A sweep's --base for tiny 1-epoch points on data: 2 steps of 16 on demo_data."""
    return (f"--data={data} --preset=demo --arch=resnet18 --batch_size=16 --global_size=32 "
            "--local_size=16 --local_crops=1 --pr_hidden_dim=32 --num_workers=0 --epochs=1 "
            "--warmup_epochs=0 --device=cpu --channels_last=False --log_every=2")


def sweep_cli(*flags, timeout=900, env=None) -> subprocess.CompletedProcess:
    """`python -m trex_fast.sweep` with flags, its output captured."""
    return subprocess.run([sys.executable, "-m", "trex_fast.sweep", *flags], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env=env)
