"""The CLI as a process: fire's --help lists every flag, a bad flag exits 2 naming it. The
stand-in parser used where fire is absent: tests/unit/test_cli.py."""
import os
import subprocess
import sys

from tests.helpers import REPO
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


