"""Runs that end (issue #26): a process whose reference loaders still have workers ends at
once, after an error or a normal return, with the right exit code; a second signal exits with
128 + signal; the one-line failures; the workers themselves are ended even when busy."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.reference import end_workers, ignore_stop_signals
from trex_fast import atomic, train
from trex_fast.demo_data import write_dataset
from trex_fast.loop import NonFiniteLossError, SecondSignal, StopSignal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Both reference loaders with 2 workers each and a pass under way, pinned by a module global
# (as frames pinned under an import did, issue #26), then an error or a normal exit.
LIVE_LOADERS = """
import sys, torch
from pipelines.batch import LoaderSettings
from pipelines.reference import ReferenceTrainData, ReferenceValData
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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_in1k")
    write_dataset(str(root), train_per_class=2, val_per_class=1)
    return str(root)


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


def test_a_second_signal_raises_second_signal_with_its_number():
    with pytest.raises(SecondSignal) as caught, StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM  # the first one only asks to stop
        os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM


@pytest.mark.parametrize("raised, code, words", [
    (SecondSignal(signal.SIGINT), 128 + signal.SIGINT, "second signal"),
    (NonFiniteLossError("the training loss became non-finite"), 1, "non-finite"),
    (atomic.NoSpaceError(28, "no space left on device while writing x"), 1, "no space left"),
])
def test_main_exits_with_the_code_that_says_how_the_run_ended(monkeypatch, capsys, raised,
                                                              code, words):
    def failing_run(cfg):
        raise raised

    monkeypatch.setattr(train, "run", failing_run)
    with pytest.raises(SystemExit) as caught:
        train.main(device="cpu")
    assert caught.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
