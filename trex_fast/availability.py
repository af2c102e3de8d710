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


def _imports(module: str) -> bool:
    """Installed and importable (a compiled extension can be present yet fail to load)."""
    if not _importable(module):
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


@functools.cache
def has_ffcv() -> bool:
    return _imports("ffcv")


@functools.cache
def has_dali() -> bool:
    return _imports("nvidia.dali")


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
