"""The stand-in flag parser, without fire and without a process."""
import sys

from trex_fast.cli import parse_flags


def test_stand_in_parser_reads_values_as_literals():
    flags = parse_flags(["--a=1", "--b=0.5,1.0", "--c", "text", "--d", "--e=False", "--f-g=x"])
    assert flags == {"a": 1, "b": (0.5, 1.0), "c": "text", "d": True, "e": False, "f_g": "x"}


def test_stand_in_runs_functions_and_subcommands_without_fire(monkeypatch, capsys):
    import pytest

    from trex_fast.cli import run_cli

    monkeypatch.setitem(sys.modules, "fire", None)  # `import fire` now raises ImportError
    calls = []
    run_cli(lambda a=1, b="x": calls.append((a, b)), ["--a=3", "--b=y"])
    run_cli({"go": lambda n=0: calls.append(n)}, ["go", "--n=2"])
    assert calls == [(3, "y"), 2]
    with pytest.raises(SystemExit, match="must be one of go"):
        run_cli({"go": lambda: None}, ["stop"])
