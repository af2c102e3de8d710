"""This Python as the GPU image has it, for tools/gpu_check.sh's dry run
(tests/e2e/test_gpu_check.py): on PYTHONPATH, it makes fire, ffcv and nvidia.dali impossible to
import (the image has neither).

With TREX_TRITON_LAUNCHES=<file> set, it also appends one JSON line per distinct Triton launch
made through the interpreter (TRITON_INTERPRET=1): the stage that launched it ($GPU_CHECK_STAGE),
the kernel, and the key Triton compiles a variant for: every constexpr's value, each tensor's
dtype and 16-byte alignment, each integer's specialisation (1, a multiple of 16, other), and
the launch options (num_warps, num_stages). Appends of one short line are atomic, so the
processes of a stage, run in parallel, share the file.
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys

BLOCKED = ("fire", "ffcv", "nvidia.dali")
LAUNCH_LOG = os.environ.get("TREX_TRITON_LAUNCHES")
INTERPRETER = "triton.runtime.interpreter"


def _blocked(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in BLOCKED)


def _specialisation(value) -> str:
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return f"{value.dtype}{' aligned' if value.data_ptr() % 16 == 0 else ''}"
    if isinstance(value, bool) or not isinstance(value, int):
        return type(value).__name__
    return "1" if value == 1 else "16n" if value % 16 == 0 else "int"


def launch_key(params, args: tuple, kwargs: dict) -> dict:
    """{parameter: its part of the variant's key} for one launch of a jit function."""
    values = {**dict(zip([p.name for p in params], args)), **kwargs}
    key = {}
    for p in params:
        value = values.get(p.name, p.default)
        key[p.name] = repr(value) if "constexpr" in str(p.annotation) else _specialisation(value)
    key.update({k: repr(v) for k, v in kwargs.items() if k not in key})  # num_warps, ...
    return key


def _record_launches(interpreter) -> None:
    import inspect

    run, seen = interpreter.InterpretedFunction.run, set()

    def recorded_run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        line = json.dumps({"stage": os.environ.get("GPU_CHECK_STAGE", ""),
                           "kernel": self.fn.__name__,
                           "key": launch_key(params, args, kwargs)}, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(LAUNCH_LOG, "a") as f:
                f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recorded_run


class _Loader(importlib.abc.Loader):
    """The interpreter's own loader, then the launch recorder on the module it made."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _record_launches(module)


class GpuImageFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)",
                                      name=name)
        if name == INTERPRETER and LAUNCH_LOG:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None:
                spec.loader = _Loader(spec.loader)
            return spec
        return None


sys.meta_path.insert(0, GpuImageFinder())
