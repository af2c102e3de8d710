"""One CLI idiom for every command: a frozen dataclass of flags, run through fire.

A command's flags are the fields of a frozen dataclass whose `metadata['help']` says what each
one does (`flag(default, help)`, or `required(help)` for a flag without a default). `command`
turns the dataclass and a function of it into the CLI entry point: the signature and --help
come from the fields, unknown flags are refused with close matches, wrong types in one line
naming the flag and what it accepts, and a user's error exits 2 with one line on stderr. The
train CLI builds its Config through the same names and types (config.make_config).

fire runs the entry point, or a minimal stand-in where fire is not installed: the GPU acceptance
machine has torch, triton, numba and opencv but not fire (DESIGN.md); the stand-in accepts the
same `--name=value` flags (values parsed as Python literals, like fire) so tools/gpu_check.sh
runs the same commands there.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import sys
import types
import typing
from dataclasses import MISSING


class FlagError(ValueError):
    """A flag with a wrong name, type or value; the message names it and what is accepted."""


# ---------------------------------------------------------------------------------------------
# the flags of a command: a frozen dataclass
# ---------------------------------------------------------------------------------------------
def flag(default, help: str, required: bool = False):
    """A dataclass field that is a CLI flag; `required` marks one that must be given although
    the dataclass has a default for other callers (e.g. "" for a path)."""
    return dataclasses.field(default=default, metadata={"help": help, "required": required})


def required(help: str):
    """A dataclass field that is a required CLI flag (no default)."""
    return dataclasses.field(metadata={"help": help, "required": True})


def is_required(f: dataclasses.Field) -> bool:
    return f.metadata.get("required", False) or (f.default is MISSING
                                                  and f.default_factory is MISSING)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default




def flags_help(cls, hidden_defaults: tuple[str, ...] = ()) -> str:
    """One line per flag: its help and its default (or 'required')."""
    lines = []
    for f in dataclasses.fields(cls):
        if is_required(f):
            tail = " (required)"
        elif f.name in hidden_defaults:
            tail = ""
        else:
            tail = f" (default {_typed_default(f)!r})"
        lines.append(f"    {f.name}: {f.metadata['help']}{tail}")
    return "\n".join(lines)


def _typed_default(f: dataclasses.Field):
    """A default as fire shows it and passes it back: a tuple of names as 'a,b' (read back
    by `coerce`), None for a required flag (so that its absence reaches our own message)."""
    value = None if is_required(f) else _default(f)
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return value


def flags_signature(cls, defaults: dict | None = None) -> inspect.Signature:
    """Every field as a keyword flag with its default, then **unknown, so that fire passes a
    mistyped flag on to `check_names` instead of answering it with its own usage screen."""
    defaults = defaults or {}
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                default=defaults.get(f.name, _typed_default(f)))
              for f in dataclasses.fields(cls)]
    return inspect.Signature(params + [inspect.Parameter("unknown",
                                                         inspect.Parameter.VAR_KEYWORD)])


# ---------------------------------------------------------------------------------------------
# names and types
# ---------------------------------------------------------------------------------------------
def check_names(given, accepted, error=FlagError, noun: str = "flag",
                tail: str = "Run with --help for all flags.") -> None:
    """Refuse the first name not in `accepted`, with up to 3 close matches."""
    accepted = list(accepted)
    for name in given:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=3)
            hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise error(f"unknown {noun} --{name}.{hint} {tail}")


def check_choice(name: str, value, choices, error=FlagError) -> None:
    """A flag whose value must be one of `choices`: one line naming it and the accepted ones."""
    if not isinstance(value, str) or value not in choices:
        raise error(f"--{name}={value!r}: accepted values are {', '.join(choices)}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(name: str, given, number: float, error) -> float:
    """Every float flag is finite: 1e999 parses as inf, which no range check refuses."""
    if not math.isfinite(number):
        raise error(f"--{name}={given!r}: must be a finite number")
    return number


def _names(name: str, value, error) -> tuple[str, ...]:
    """A comma-separated list: fire gives 'a,b' as a tuple, 'a' as a str, '0' as an int."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (tuple, list)) or _is_number(value):
        items = value if isinstance(value, (tuple, list)) else [value]
    else:
        raise error(f"--{name}={value!r}: expected a comma-separated list")
    return tuple(s for s in (str(v).strip() for v in items) if s)


def coerce(name: str, hint, value, error=FlagError):
    """Check one flag's type (fire has parsed it as a Python literal) and normalise it."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise error(f"--{name}={value!r}: expected True or False")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise error(f"--{name}={value!r}: expected an integer")
    if hint is float:
        if _is_number(value):
            return _finite(name, value, float(value), error)
        raise error(f"--{name}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if _is_number(value):
            return str(value)  # e.g. --data=123 parsed as a number by fire
        raise error(f"--{name}={value!r}: expected a string")
    if typing.get_args(hint)[1:] == (Ellipsis,):  # tuple[str, ...]
        return _names(name, value, error)
    # tuple[float, float]: fire gives a tuple or list for "0.2,1.0"
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value)):
        return tuple(_finite(name, value, float(v), error) for v in value)
    raise error(f"--{name}={value!r}: expected two numbers, e.g. --{name}=0.25,1.0")


def make_settings(cls, flags: dict, error=FlagError, noun: str = "flag",
                  tail: str = "Run with --help for all flags."):
    """The dataclass from CLI flags: unknown names refused, types checked, required flags
    present; the flags not given keep the dataclass's defaults."""
    check_names(flags, [f.name for f in dataclasses.fields(cls)], error, noun, tail)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = flags.get(f.name)
        if value is None or (f.metadata.get("required") and value in ("", ())):
            if is_required(f):
                raise error(f"--{f.name} is required: {f.metadata['help']}")
            if f.name not in flags:
                continue
        values[f.name] = coerce(f.name, hints[f.name], value, error)
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------
def fail(program: str, message: str, code: int = 2) -> typing.NoReturn:
    """A user's error (code 2) or a run that failed for a reason it explains: one line."""
    print(f"{program}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def command(cls, run, program: str, doc: str, user_errors: tuple = (), noun: str = "flag",
            tail: str = "Run with --help for all flags."):
    """The CLI entry point of `run(settings: cls)`: flags from the dataclass's fields, --help
    from their metadata, FlagError and `user_errors` as one line on stderr and exit 2."""
    def main(**flags) -> None:
        try:
            run(make_settings(cls, flags, FlagError, noun, tail))
        except (FlagError, *user_errors) as e:
            fail(program, f"error: {e}")

    main.__signature__ = flags_signature(cls)
    main.__doc__ = f"{doc}\n\nFlags:\n{flags_help(cls)}\n"
    main.__name__ = main.__qualname__ = run.__name__
    return main


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
