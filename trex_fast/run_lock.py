"""One run per output directory (issue #26): `run.lock`, held for the run's life.

The lock is an flock on output_dir/run.lock, which also names its holder (pid, host, start
time, as JSON). The kernel drops an flock when its process dies, however it dies, so a second
run that finds the lock held refuses, naming the holder, and writes nothing; one that finds
the holder's name but no flock takes over from a killed run, saying so. Filesystems that share
a directory between hosts do not always carry flocks from host to host, so a holder on another
host counts as live while its file is younger than STALE_AFTER_S: the holder touches it every
HEARTBEAT_S. A run that ends (success, error or signal) empties the file and unlocks it.
Under torchrun only rank 0, which writes the outputs, holds it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager

LOCK_NAME = "run.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # a lock from another host untouched this long is from a dead run


class OutputDirError(OSError):
    """The output directory cannot be created or written; the message names it."""


class RunLockedError(RuntimeError):
    """Another live run holds the output directory; the message names it."""


def prepare_output_dir(path: str) -> None:
    """Create output_dir, or say in one line why it cannot be used, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"--output_dir={path!r}: cannot create it ({e.strerror})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output_dir={path!r}: not writable by this user")


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {"pid": "?", "host": "?", "started": f"unreadable: {text[:40]!r}"}
    return holder if isinstance(holder, dict) else None


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}")


def _live_elsewhere(holder: dict, path: str) -> bool:
    """A holder on another host whose heartbeat is recent (its flock may not reach us)."""
    if holder.get("host") == socket.gethostname():
        return False  # this host's kernel would have kept the flock: the holder is gone
    return time.time() - os.stat(path).st_mtime < STALE_AFTER_S


def _write_holder(fd: int) -> dict:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)  # a few bytes in one write: a reader sees all of it or nothing
    os.fsync(fd)
    return holder


def _refuse(path: str, holder: dict | None) -> RunLockedError:
    who = describe(holder) if holder else "another process"
    return RunLockedError(f"{os.path.dirname(path)} is in use by the run of {who} ({path}); "
                          "wait for it to end or stop it, or use another --output_dir")


def acquire(out_dir: str, log=print) -> int:
    """Take out_dir's lock; returns its file descriptor (release() gives it back). Raises
    RunLockedError naming the live holder; takes over, saying so, from a dead one."""
    path = os.path.join(out_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(path, _read_holder(fd)) from None
        previous = _read_holder(fd)
        if previous is not None:
            if _live_elsewhere(previous, path):
                raise _refuse(path, previous)
            log(f"{path}: taking over the lock of a run that is gone ({describe(previous)})")
        _write_holder(fd)
    except BaseException:
        os.close(fd)  # drops the flock, if taken
        raise
    return fd


def release(fd: int) -> None:
    """Empty the lock file (a clean end leaves no holder) and unlock it."""
    os.ftruncate(fd, 0)
    os.close(fd)


def _heartbeat(fd: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        os.utime(fd)


@contextmanager
def held(out_dir: str, log=print):
    """out_dir created and locked for the body (see the module's docstring)."""
    prepare_output_dir(out_dir)
    fd = acquire(out_dir, log)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fd, stop), daemon=True,
                            name="run-lock-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        release(fd)
