"""One run per output directory (issue #26): a dead holder's lock is taken over saying so,
another host's lock counts until its heartbeat is stale, and an unusable --output_dir is
refused up front. The holder, a second run refused, other ranks: tests/unit/test_run_lock.py."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO
from trex_fast import run_lock


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


def test_an_unusable_output_dir_is_refused_in_one_line_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trex_fast.train", "--output_dir=/dev/null/x",
                             "--data=/nonexistent"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)  # --data is checked later, while planning: not reached
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trex_fast.train: error: --output_dir='/dev/null/x': cannot create it (Not a "
        "directory)"], result.stderr
