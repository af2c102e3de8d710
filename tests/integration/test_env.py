"""`python -m trex_fast.env`, the availability probes behind it, and setup.py's requirements."""
import os
import runpy
import subprocess
import sys

import pytest
import setuptools
import torch
from packaging.requirements import Requirement

from tests.helpers import REPO
from trex_fast import availability

NAMES = ("cuda", "bf16", "ffcv", "dali", "dali_gpu", "triton", "nvjpeg")


@pytest.fixture
def fresh_probes():
    for probe in availability.PROBES:
        probe.cache_clear()
    yield
    for probe in availability.PROBES:
        probe.cache_clear()


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


def test_a_backend_that_fails_to_import_is_reported_with_the_error(fresh_probes, monkeypatch):
    real = availability.importlib.import_module

    def import_module(name, *args):
        if name == "ffcv":
            raise OSError("libopencv_core.so.406: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(availability, "_importable", lambda module: True)
    monkeypatch.setattr(availability.importlib, "import_module", import_module)
    probe = availability.probe_ffcv()
    assert not probe.ok and not availability.has_ffcv()
    assert "OSError: libopencv_core.so.406" in probe.why and ".[ffcv]" in probe.why


def test_dali_gpu_mode_needs_a_driver_for_its_cuda_build(fresh_probes, monkeypatch):
    yes = availability.Probe("x", True, "")
    monkeypatch.setattr(availability, "probe_dali", lambda: yes)
    monkeypatch.setattr(availability, "probe_cuda", lambda: yes)
    monkeypatch.setattr(availability, "_dali_dist", lambda: ("nvidia-dali-cuda130", "2.4", 13))
    monkeypatch.setattr(availability, "driver_cuda_version", lambda: (12, 4))
    probe = availability.probe_dali_gpu()
    assert not probe.ok and "CUDA 13 driver" in probe.why and ".[dali-cuda12]" in probe.why
    availability.probe_dali_gpu.cache_clear()
    monkeypatch.setattr(availability, "driver_cuda_version", lambda: (13, 0))
    assert availability.probe_dali_gpu().ok


def _setup_kwargs(monkeypatch) -> dict:
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(REPO)
    runpy.run_path(os.path.join(REPO, "setup.py"))
    return captured


def test_setup_requires_supported_ranges_not_exact_pins(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    reqs = {r.name: r for r in map(Requirement, kw["install_requires"])}
    for name, ok, too_new in (("torch", ("2.11.0", "2.14.1"), "2.15.0"),
                              ("torchvision", ("0.26.0", "0.29.1"), "0.30.0")):
        assert all(v in reqs[name].specifier for v in ok), reqs[name]
        assert too_new not in reqs[name].specifier and "2.10.0" not in reqs["torch"].specifier
    extras = kw["extras_require"]
    assert extras["dali"] == ["nvidia-dali-cuda130"]
    assert extras["dali-cuda12"] == ["nvidia-dali-cuda120"]
    assert [r for r in extras["all"] if "dali" in r] == ["nvidia-dali-cuda130"]
    setup_env = open(os.path.join(REPO, "tools", "setup_env.sh")).read()
    assert 'TESTED="torch==2.14.1 torchvision==0.29.1' in setup_env
    assert "pip install -q numpy $TESTED" in setup_env
