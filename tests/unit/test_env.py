"""Back-end probes in process: an import failure reported with its error, DALI's GPU mode and
its driver, and setup.py's supported ranges."""
import os
import runpy

import pytest
import setuptools
from packaging.requirements import Requirement

from tests.helpers import REPO
from trex_fast import availability


@pytest.fixture
def fresh_probes():
    for probe in availability.PROBES:
        probe.cache_clear()
    yield
    for probe in availability.PROBES:
        probe.cache_clear()


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
