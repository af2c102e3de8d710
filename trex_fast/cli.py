"""Command lines through fire, with a minimal stand-in where fire is not installed.

The GPU acceptance machine has torch, triton, numba and opencv but not fire (DESIGN.md); the
stand-in accepts the same `--name=value` flags (values parsed as Python literals, like fire)
so tools/gpu_check.sh runs the same commands there.
"""
from __future__ import annotations

import ast
import sys


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_flags(argv: list[str]) -> dict:
    """['--a=1', '--flag', '--noflag', '--b', 'x'] -> {'a': 1, 'flag': True, 'noflag'...}."""
    flags, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; flags are --name=value")
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, eq, i = argv[i + 1], "=", i + 1
        flags[name.replace("-", "_")] = _literal(value) if eq else True
        i += 1
    return flags


def run_cli(fn, argv: list[str] | None = None):
    """fire.Fire(fn), or the stand-in when fire is missing (then --help prints the docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        import fire
    except ImportError:
        if {"--help", "-h"} & set(argv):
            print(fn.__doc__)
            return None
        return fn(**parse_flags(argv))
    # `--help`/`-h` reach fire's own help (a **flags signature would take them as a flag).
    wants_help = {"--help", "-h"} & set(argv)
    return fire.Fire(fn, command=["--", "--help"] if wants_help else argv)
