"""`python -m trex_fast.env` and what importing the availability probes imports. The probes and
setup.py's requirements in process: tests/unit/test_env.py."""
import subprocess
import sys

import torch

from tests.helpers import REPO

NAMES = ("cuda", "bf16", "ffcv", "dali", "dali_gpu", "triton", "nvjpeg")


def test_env_prints_every_backend_with_its_reason():
    proc = subprocess.run([sys.executable, "-m", "trex_fast.env"], capture_output=True,
                          text=True, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line.split(maxsplit=2)[1:] for line in proc.stdout.splitlines()[1:]}
    assert list(lines) == [*NAMES, "auto"]
    for name in NAMES:
        answer, why = lines[name]
        assert answer in ("yes", "no") and len(why) > 10, (name, answer, why)
    assert lines["cuda"][0] == ("yes" if torch.cuda.is_available() else "no")
    assert proc.stdout.splitlines()[0].startswith("Python ")
    if not torch.cuda.is_available():
        assert proc.stdout.splitlines()[-1].split() == ["auto", "device=cpu", "precision=fp32",
                                                        "loss_impl=torch", "stage_impl=torch"]
        assert all(lines[n][0] == "no" for n in ("bf16", "dali_gpu", "triton", "nvjpeg"))


def test_importing_availability_imports_no_optional_backend():
    code = ("import sys, trex_fast.availability as a; "
            "print(sorted(m for m in ('ffcv', 'nvidia.dali', 'triton', 'torchvision', 'numba') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


