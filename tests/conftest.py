"""Skip gpu/ffcv/dali-marked tests cleanly where that back-end is absent; the fixtures every
layer shares (tests/_runs.py, tests/_transfer_fixture.py)."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; set before any kernel is launched.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under `pytest -n N` (pytest-xdist) each worker gets its share of the cores, for torch here and
# (OMP_NUM_THREADS) for every process a test starts: N workers each running torch on every
# core would oversubscribe the machine, and OpenMP threads spin while they wait.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

# shared fixtures, for every layer (docs/TESTS.md)
from tests._runs import demo_data, shared_run  # noqa: F401
from tests._transfer_fixture import layouts  # noqa: F401
from trex_fast import availability

_REQUIREMENTS = {
    "gpu": (availability.has_cuda, "no CUDA device"),
    "ffcv": (availability.has_ffcv, "ffcv is not installed"),
    "dali": (availability.has_dali, "nvidia-dali is not installed"),
}


@pytest.fixture
def no_jit():
    """FFCV without numba compilation: tiny unit tests skip the ~18 s first-batch compile."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under -n N (pytest-xdist), unless another --dist is asked for: each test file on one
    worker (a module fixture is made once), handed out in collection order. xdist's loadfile
    orders files by test count, which sends the e2e files, few tests but the longest, last and
    leaves a worker idle at the end; in collection order tests/e2e goes first and the short unit
    files fill in at the end."""
    if config.getvalue("dist") != "load":  # -n alone gives "load"
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # read by LoadScopeScheduling.schedule
    return LoadFileScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Probe a back-end when a test that needs it is about to run (before its fixtures), not at
    collection: importing ffcv and DALI takes ~7 s, and under -n 2 a worker that runs none of
    their tests never pays it."""
    for marker, (probe, reason) in _REQUIREMENTS.items():
        if item.get_closest_marker(marker) is not None and not probe():
            item.add_marker(pytest.mark.skip(reason=reason))  # read by pytest's skipping hook
