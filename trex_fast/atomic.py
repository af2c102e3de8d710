"""The one way trex_fast writes a file (issue #15): to a temporary name in the same directory,
flushed and fsynced, renamed into place, then the directory fsynced.

A file under its final name is therefore always complete (a kill -9 leaves the previous
version, never half of the new one), and after the call returns it survives a power loss: the
data is on disk (file fsync) and so is the name pointing at it (directory fsync; a rename
alone can be lost). Every writer uses it: checkpoints, metrics, config and env, backbone
exports, eval outputs, the demo dataset and the converter.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import BinaryIO


def temp_name(path: str) -> str:
    """A hidden sibling of path. The pid keeps two writers of one file (an orphaned worker of
    a killed run and its rerun) off each other's temporary file."""
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(head, f".{tail}.{os.getpid()}.tmp")


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


def write_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
    """write(f) into a temporary file, fsync it, rename it to path, fsync the directory."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
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
