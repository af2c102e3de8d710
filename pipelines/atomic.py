"""The one way trex_fast writes a file (issue #15): to a temporary name in the same directory,
flushed and fsynced, renamed into place, then the directory fsynced.

A file under its final name is therefore always complete (a kill -9 leaves the previous
version, never half of the new one), and after the call returns it survives a power loss: the
data is on disk (file fsync) and so is the name pointing at it (directory fsync; a rename
alone can be lost). Every writer uses it: checkpoints, metrics, config and env, backbone
exports, eval outputs, the demo dataset and the converter.

Temporary files follow one naming rule, `.<name>.<pid>.tmp` (temp_name), and remove_stale_temps
is the one cleanup that matches it: a kill -9 mid-write leaves such a file, and the next run
removes it at its start (issue #26). A full disk is reported as NoSpaceError, naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from typing import BinaryIO

_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # temp_name's rule: .<name>.<pid>.tmp


class NoSpaceError(OSError):
    """The disk filled up while writing a file; the message names the file."""


def temp_name(path: str) -> str:
    """A hidden sibling of path. The pid keeps two writers of one file (an orphaned worker of
    a killed run and its rerun) off each other's temporary file."""
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(head, f".{tail}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str) -> list[str]:
    """Remove the temporary files of writers that are gone (named by temp_name, their pid no
    longer running on this host) from folder; returns their paths. Call it while holding the
    folder's run lock, so that no writer of this run is live."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMP.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(path) and not _pid_alive(int(match.group(1))):
            os.remove(path)
            removed.append(path)
    return removed


def fsync_dir(path: str) -> None:
    """Make the renames and creations inside directory `path` durable."""
    fd = os.open(os.fspath(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: str, dst: str) -> None:
    """os.replace(src, dst) (a file or a directory), then fsync dst's directory."""
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


class _RecordingFile:
    """The file, remembering an OSError of its write: a C++ writer (torch.save) may turn it
    into its own error that no longer says "no space left"."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _no_space(error: BaseException | None, recorded: OSError | None) -> bool:
    for e in (recorded, error, getattr(error, "__context__", None)):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
    return False


def write_temp(path: str, write: Callable[[BinaryIO], object]) -> str:
    """write(f) into path's temporary file and fsync it; returns the temporary file's path
    (the caller renames it into place). On failure it is removed; a full disk raises
    NoSpaceError naming path."""
    tmp = temp_name(path)
    f = None
    try:
        with open(tmp, "wb") as raw:
            f = _RecordingFile(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _no_space(e, f.error if f is not None else None):
            raise NoSpaceError(errno.ENOSPC, f"no space left on device while writing {path} "
                               "(nothing was replaced: its previous version, if any, is "
                               "intact)") from e
        raise
    return tmp


def write_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
    """write(f) into a temporary file, fsync it, rename it to path, fsync the directory."""
    tmp = write_temp(path, write)
    try:
        replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_json(path: str, obj, indent: int | None = 2) -> None:
    text = json.dumps(obj, indent=indent, default=str) + "\n"
    write_bytes(path, text.encode())


def save_torch(obj, path: str) -> None:
    """torch.save(obj) to path, atomically and durably."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def fsync_tree(root: str) -> None:
    """fsync every file and directory under root (before renaming a finished tree in place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)
