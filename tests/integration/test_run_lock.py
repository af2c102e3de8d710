"""One run per output directory (issue #26): the lock names its holder, a second run refuses
in one line before any work and writes nothing, a dead holder's lock is taken over saying so,
other ranks take no lock, and an unusable --output_dir is refused up front."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, tiny_config
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


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _left_by(out, host: str, age_s: float = 0.0) -> None:
    path = out / run_lock.LOCK_NAME
    path.write_text(json.dumps({"pid": _dead_pid(), "host": host, "started": "then"}))
    os.utime(path, (time.time() - age_s,) * 2)


def test_a_killed_runs_lock_is_taken_over_saying_so(tmp_path):
    _left_by(tmp_path, socket.gethostname())  # its flock died with it
    messages = []
    run_lock.release(run_lock.acquire(str(tmp_path), log=messages.append))
    assert len(messages) == 1 and "taking over the lock of a run that is gone" in messages[0]


def test_another_hosts_lock_counts_until_its_heartbeat_is_stale(tmp_path):
    _left_by(tmp_path, "elsewhere")  # flocks may not reach across hosts: trust its heartbeat
    with pytest.raises(run_lock.RunLockedError, match="on host elsewhere"):
        run_lock.acquire(str(tmp_path))
    _left_by(tmp_path, "elsewhere", age_s=run_lock.STALE_AFTER_S + 1)
    messages = []
    run_lock.release(run_lock.acquire(str(tmp_path), log=messages.append))
    assert "host elsewhere" in messages[0]


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


def test_an_unusable_output_dir_is_refused_in_one_line_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trex_fast.train", "--output_dir=/dev/null/x",
                             "--data=/nonexistent"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)  # --data is checked later, while planning: not reached
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trex_fast.train: error: --output_dir='/dev/null/x': cannot create it (Not a "
        "directory)"], result.stderr
