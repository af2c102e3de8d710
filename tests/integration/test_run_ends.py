"""Runs that end (issue #26): a process whose reference loaders still have workers ends at
once, after an error or a normal return, with the right exit code; the workers themselves are
ended even when busy; a training run with a worker exits after success and after an error. The
in-process checks (second signal, exit codes) are in tests/unit/test_run_ends.py."""
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.loaders.reference import end_workers, ignore_stop_signals
from tests.helpers import REPO

# Both reference loaders with 2 workers each and a pass under way, pinned by a module global
# (as frames pinned under an import did, issue #26), then an error or a normal exit.
LIVE_LOADERS = """
import sys, torch
from pipelines.batch import LoaderSettings
from pipelines.loaders.reference import ReferenceTrainData, ReferenceValData
from pipelines.spec import multicrop_spec
from trex_fast.config import make_config

root, ending = sys.argv[1], sys.argv[2]
cfg = make_config("demo", global_size=32, local_size=16, local_crops=1)
settings = LoaderSettings(4, 2, 0, 0, 1, torch.device("cpu"), torch.float32, False)
train = ReferenceTrainData(root + "/train", multicrop_spec(cfg), settings)
val = ReferenceValData(root + "/val", 32, settings)
PINNED = [train.epoch(0), iter(val)]
next(PINNED[0]), next(PINNED[1])
print("workers live", flush=True)
if ending == "error":
    raise RuntimeError("a failure while the workers live")
"""


@pytest.fixture
def data(demo_data):
    return demo_data


@pytest.mark.parametrize("ending, code", [("error", 1), ("return", 0)])
def test_a_process_with_live_reference_workers_ends_at_once(data, ending, code):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", LIVE_LOADERS, data, ending], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert "workers live" in result.stdout, result.stderr
    assert result.returncode == code, result.stderr
    assert time.monotonic() - start < 60  # it hung forever before issue #26


class _Slow(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        time.sleep(60)  # a worker busy with a batch when the run ends
        return index


def test_end_workers_ends_busy_workers_that_ignore_sigterm(monkeypatch):
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.5)
    loader = DataLoader(_Slow(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
    iterator = iter(loader)
    time.sleep(0.5)  # the workers are inside __getitem__
    start = time.monotonic()
    end_workers(iterator)
    assert time.monotonic() - start < 10
    assert not any(w.is_alive() for w in iterator._workers)
    end_workers(iterator)  # idempotent
    end_workers(iter(DataLoader(_Slow(), num_workers=0)))  # no workers: nothing to do


# The smallest training run with a loader worker: demo_data's 32 images, 4 steps, 1 epoch.
TINY_RUN = ["--preset=demo", "--arch=resnet18", "--batch_size=8", "--global_size=32",
            "--local_size=16", "--local_crops=1", "--memory_size=16", "--pr_hidden_dim=16",
            "--pr_bottleneck_dim=8", "--epochs=1", "--warmup_epochs=0", "--device=cpu",
            "--channels_last=False", "--num_workers=1", "--log_every=1"]


def test_a_training_run_with_workers_ends_after_success_and_after_an_error(data, tmp_path):
    """The one end-to-end run of issue #26, both cases at once: a run that finishes and one
    whose loss becomes non-finite (with its worker live) both exit, with their codes."""
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    ok.mkdir()
    stale = ok / ".checkpoint.pt.999999999.tmp"  # a killed writer's (no such pid)
    stale.write_bytes(b"cut")
    runs = {name: subprocess.Popen(
        [sys.executable, "-m", "trex_fast.train", *TINY_RUN, f"--data={data}",
         f"--output_dir={out}", *extra], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
        for name, out, extra in (("ok", ok, []), ("bad", bad, ["--lr=1e30"]))}
    start = time.monotonic()
    ended = {name: (*proc.communicate(timeout=300), proc.returncode)
             for name, proc in runs.items()}
    assert time.monotonic() - start < 300  # each hung forever before issue #26
    out, err, code = ended["ok"]
    assert code == 0 and "done: val top-1" in out, err
    assert f"removed {stale}" in out and not stale.exists()
    assert (ok / "run.lock").read_text() == ""  # released
    out, err, code = ended["bad"]
    assert code == 1, err
    last = err.strip().splitlines()[-1]  # the lines before it: the progress bar's
    assert last.startswith("trex_fast.train: error: the training loss became non-finite"), err
    assert "Traceback" not in err and "there is no checkpoint yet" in last
    assert not (bad / "checkpoint.pt").exists()
