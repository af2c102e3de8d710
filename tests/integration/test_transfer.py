"""The transfer evaluation CLI reports a missing dataset in one line (issue #16)."""
import subprocess
import sys

from tests.helpers import REPO


def test_cli_reports_a_missing_dataset_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trex_fast.eval", "transfer", "--backbone=x.pth",
                           "--datasets=sun397", f"--data_root={tmp_path}"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "'sun397'" in line and "SUN397/{ClassName.txt" in line and "SUN397" in line
