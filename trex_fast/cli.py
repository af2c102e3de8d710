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
    """fire.Fire(fn), or the stand-in when fire is missing. `fn` is a function or a dict of
    subcommands ({"name": function}); the stand-in then takes the name as the first argument."""
    argv = sys.argv[1:] if argv is None else argv
    wants_help = bool({"--help", "-h"} & set(argv))
    rest = [a for a in argv if a not in ("--help", "-h")]
    try:
        import fire
    except ImportError:
        if isinstance(fn, dict):
            if not rest or rest[0] not in fn:
                raise SystemExit("error: the first argument must be one of "
                                 f"{', '.join(fn)}") from None
            fn, rest = fn[rest[0]], rest[1:]
        if wants_help:
            print(fn.__doc__)
            return None
        return fn(**parse_flags(rest))
    # `--help`/`-h` reach fire's own help (a **flags signature would take them as a flag).
    return fire.Fire(fn, command=rest + ["--", "--help"] if wants_help else argv)
