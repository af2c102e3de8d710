"""The converter's writes go through pipelines.atomic: write, fsync, rename, fsync the directory,
so a file under its final name is always complete (kill -9 safe) and durable."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pipelines import atomic


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    atomic.write_atomic(str(path), write)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    atomic.write_bytes(str(path), data)


def replace_durably(src: Path, dst: Path) -> None:
    atomic.replace_durably(str(src), str(dst))
