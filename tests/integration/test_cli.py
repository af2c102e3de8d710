"""The CLI: fire's --help lists every flag; the stand-in parser used where fire is absent."""
import os
import subprocess
import sys

from tests.helpers import REPO
from trex_fast.cli import parse_flags
from trex_fast.config import FIELDS


def test_help_lists_every_flag_with_its_help_text():
    proc = subprocess.run([sys.executable, "-m", "trex_fast.train", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PAGER": "cat"})
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr  # fire writes help to stderr when not on a terminal
    for name, field in FIELDS.items():
        assert f"{name}: {field.metadata['help'][:30]}" in shown, name
        assert f"--{name}=" in shown, name


def test_bad_flag_exits_2_naming_it_before_any_work():
    proc = subprocess.run([sys.executable, "-m", "trex_fast.train", "--memory_size=-5"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "--memory_size=-5: must be >= 0" in proc.stderr


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
