"""The run lock, in process: it names its holder, a second taker is refused, and a second run
refuses before any work and writes nothing."""
import json
import os
import socket

import pytest

from tests.helpers import tiny_config
from trex_fast import plan, run_lock, train
from trex_fast.distributed import DistInfo
from trex_fast.loop import StopSignal


def _holder(out) -> dict | None:
    text = (out / run_lock.LOCK_NAME).read_text()
    return json.loads(text) if text else None


def test_the_lock_names_its_holder_and_a_second_taker_is_refused(tmp_path):
    with run_lock.held(str(tmp_path), log=print):
        holder = _holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(run_lock.RunLockedError) as caught:
            run_lock.acquire(str(tmp_path))  # another open file: flock says it is held
        text = str(caught.value)
        assert f"pid {os.getpid()} on host {holder['host']}, started {holder['started']}" in text
        assert "another --output_dir" in text and "\n" not in text
    assert _holder(tmp_path) is None  # a clean end leaves no holder
    run_lock.release(run_lock.acquire(str(tmp_path)))  # and the next run takes it silently


def test_a_second_run_refuses_before_any_work_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(output_dir=str(out), num_workers=0)

    def no_work(*args, **kwargs):
        raise AssertionError("plan_run (loaders, data) reached")

    monkeypatch.setattr(train, "plan_run", no_work)
    with run_lock.held(str(out), log=print):
        before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
        with pytest.raises(run_lock.RunLockedError):
            train.run(cfg)
        assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # another rank of a torchrun job takes no lock: it goes on to plan its run
    with run_lock.held(str(out), log=print), StopSignal() as stop:
        with pytest.raises(AssertionError, match="plan_run"):
            train._run_stoppable(cfg, DistInfo(1, 2, 1, 2), "cpu", stop)
    assert plan.output_dir(cfg) == str(out)
