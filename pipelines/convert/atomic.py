"""Write-then-rename, so a file under its final name is always complete (kill -9 safe)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temp_name(path: Path) -> Path:
    # The pid keeps two writers of the same file (an orphaned worker of a killed run and its
    # rerun) off each other's temporary file; both write the same bytes, so either rename wins.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    tmp = temp_name(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))
