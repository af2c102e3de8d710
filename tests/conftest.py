"""Skip gpu/ffcv/dali-marked tests cleanly where that back-end is absent; the fixtures every
layer shares (tests/_runs.py, tests/_transfer_fixture.py)."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; set before any kernel is launched.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, (probe, reason) in _REQUIREMENTS.items():
            if item.get_closest_marker(marker) is not None and not probe():
                item.add_marker(pytest.mark.skip(reason=reason))
