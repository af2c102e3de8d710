"""The one place that decides which optional back-ends are usable (DESIGN.md).

Nothing here imports ffcv, DALI or Triton at module import: each probe imports lazily and
caches the answer, so `import trex_fast` costs torch alone.
"""
from __future__ import annotations

import functools
import importlib.util

import torch


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def has_ffcv() -> bool:
    if not _importable("ffcv"):
        return False
    try:
        import ffcv  # noqa: F401  (the compiled extension can fail to load)
    except Exception:
        return False
    return True


@functools.cache
def has_dali() -> bool:
    if not _importable("nvidia.dali"):
        return False
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def has_triton() -> bool:
    return _importable("triton")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def require(name: str, available: bool, extra: str) -> None:
    """Raise a clear error naming the missing back-end and how to install it."""
    if not available:
        raise RuntimeError(
            f"{name} is not installed or failed to import; install it with "
            f"`pip install -e '.[{extra}]'` (tools/setup_env.sh installs everything)"
        )
