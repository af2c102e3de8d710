"""Compile every Triton kernel of the project ahead of time for a named GPU target (issue 14).

No GPU is needed: each kernel module's `aot_kernels()` (pipelines/stage/aot.py) lists its
production launch configurations; each is compiled with triton.compile (an ASTSource for a
GPUTarget) and its PTX assembled again by the installed triton's own cubin stage (its ptxas
and its flags, whatever the triton version) with the ptxas log captured, which reports
registers and spills. One JSON line per kernel and configuration goes to stdout as soon as it
is built:

    kernel, file, target, registers, spill_bytes (bytes of spill stores), spill_load_bytes,
    stack_bytes, shared_bytes (triton's shared memory per program), programs_per_sm (resident
    at once on one SM of the target, from registers, shared memory and warps), mma ("wgmma",
    "mma.sync" or "none", read from the PTX), num_warps, num_stages, production, has_dot,
    constexprs, triton (version), ptxas (version)

A kernel that fails to compile, or needs more shared memory than the target has, gets an
"error" field instead and makes the exit status 1; the others still run. A module that is not
there yet is skipped with a note on stderr; one that is there but fails to import is an error.
--strict also exits 1 when a production configuration spills registers.

    python tools/aot_check.py --target=sm_90a
    python tools/aot_check.py --target=sm_80 --strict
"""
from __future__ import annotations

import os

# Under TRITON_INTERPRET=1 triton.jit builds interpreter stand-ins that cannot be compiled;
# this must happen before triton or any kernel module is imported.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a bare checkout too

from pipelines.stage.aot import TARGETS, programs_per_sm  # noqa: E402

KERNEL_MODULES = ("trex_fast.kernels.prototype_ce", "pipelines.stage.triton_multicrop")
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=sorted(TARGETS), default="sm_90a",
                        help="GPU architecture to compile for (default sm_90a: H100/H200)")
    parser.add_argument("--modules", type=lambda s: tuple(s.split(",")), default=KERNEL_MODULES,
                        help="comma-separated kernel modules (default: every module of the "
                             "project)")
    parser.add_argument("--strict", action="store_true",
                        help="also exit 1 when a production configuration spills registers")
    return parser.parse_args(argv)


def _inside(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(ROOT)


def load_kernels(module_name: str) -> list:
    """The module's aot_kernels(), or [] when the module is not there (yet).

    Not there also covers a module whose top-level package is this checkout's but which would
    resolve outside it (an editable install of another checkout filling the gap): this tool
    checks the kernels of its own checkout only.
    """
    parts = module_name.split(".")
    top = importlib.util.find_spec(parts[0])
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        spec = importlib.util.find_spec(prefix)  # imports only the prefix's parent
        if spec is None or (_inside(top.origin) and not _inside(spec.origin)):
            where = "not found" if spec is None else f"resolves outside {ROOT}: {spec.origin}"
            print(f"aot_check: skipping {module_name}: {prefix} {where}", file=sys.stderr,
                  flush=True)
            return []
    return list(importlib.import_module(module_name).aot_kernels())


def _source_file(fn) -> str:
    path = Path(inspect.getsourcefile(getattr(fn, "fn", fn))).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _ast_source(kernel):
    """triton.compiler.ASTSource with every argument typed and the JIT's 16-divisibility
    specialisation of pointers and of the integers the kernel lists."""
    from triton.compiler import ASTSource

    arg_names = list(kernel.fn.arg_names)
    given = list(kernel.signature) + list(kernel.constexprs)
    if sorted(given) != sorted(arg_names):
        raise ValueError(f"signature + constexprs {given} do not match the arguments "
                         f"{arg_names}")
    signature = {name: kernel.signature.get(name, "constexpr") for name in arg_names}
    aligned = [name for name, ty in kernel.signature.items()
               if ty.startswith("*") or name in kernel.divisible_by_16]
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return ASTSource(fn=kernel.fn, signature=signature, constexprs=dict(kernel.constexprs),
                     attrs=attrs)


def _backend_and_options(target_name: str, num_warps: int, num_stages: int):
    """triton's CUDA backend for the target and its compile options, as the JIT makes them."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", TARGETS[target_name].capability, 32)
    backend = triton.compiler.make_backend(target)
    return backend, backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})


@functools.cache  # the same PTX at several shapes is assembled once
def _ptxas_report(ptx: str, target_name: str, num_warps: int, num_stages: int) -> dict:
    """registers / spills / stack from the ptxas log of triton's own cubin stage on the PTX it
    generated: the installed triton's ptxas with the installed triton's flags (issue 22, item
    7: they differ between triton versions), its log printed under dump_ptxas_log."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    backend, options = _backend_and_options(target_name, num_warps, num_stages)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        backend.make_cubin(ptx, {}, options, backend.target.arch)
    text = log.getvalue()
    spills = _SPILLS.search(text)
    if spills is None:
        raise RuntimeError(f"no ptxas -v report in triton's log: {text[:300]!r}")
    stack, stores, loads = (int(x) for x in spills.groups())
    return dict(registers=int(_REGS.search(text).group(1)), spill_bytes=stores,
                spill_load_bytes=loads, stack_bytes=stack,
                ptxas=str(get_ptxas(backend.target.arch).version))


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def check_kernel(kernel, target_name: str) -> dict:
    """Compile one configuration and describe it; raises on a compile failure."""
    import triton

    limits = TARGETS[target_name]
    backend, options = _backend_and_options(target_name, kernel.num_warps, kernel.num_stages)
    start = time.perf_counter()
    compiled = triton.compile(_ast_source(kernel), target=backend.target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    record = dict(**_ptxas_report(ptx, target_name, kernel.num_warps, kernel.num_stages),
                  shared_bytes=compiled.metadata.shared, mma=mma_kind(ptx),
                  triton=triton.__version__)
    record["programs_per_sm"] = programs_per_sm(limits, record["registers"],
                                                record["shared_bytes"], kernel.num_warps)
    record["compile_s"] = round(time.perf_counter() - start, 2)
    if record["shared_bytes"] > limits.shared_per_block:
        record["error"] = (f"needs {record['shared_bytes']} bytes of shared memory, "
                           f"{target_name} has {limits.shared_per_block}")
    return record


def describe(kernel, target_name: str) -> dict:
    return dict(kernel=kernel.name, file=_source_file(kernel.fn), target=target_name,
                num_warps=kernel.num_warps, num_stages=kernel.num_stages,
                production=kernel.production, has_dot=kernel.has_dot,
                constexprs={k: str(v) for k, v in kernel.constexprs.items()})


def _error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' | '.join(lines[:3])[:500]}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = False
    for module_name in args.modules:
        try:
            kernels = load_kernels(module_name)
        except Exception as exc:  # reported as a JSON line, then the next module
            print(json.dumps(dict(kernel=None, module=module_name, target=args.target,
                                  error=_error(exc))), flush=True)
            failed = True
            continue
        for kernel in kernels:
            record = describe(kernel, args.target)
            try:
                record.update(check_kernel(kernel, args.target))
            except Exception as exc:  # one failing kernel must not hide the others
                record["error"] = _error(exc)
            failed |= "error" in record
            failed |= bool(args.strict and kernel.production and record.get("spill_bytes"))
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
