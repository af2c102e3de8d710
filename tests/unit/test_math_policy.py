"""build.set_math_policy: the TF32 / cuDNN flags of CUDA runs, checked on the CPU (the flags
are process-wide settings that exist without a GPU)."""
import pytest
import torch

from tests.helpers import SINGLE, tiny_config, tiny_state
from trex_fast import build
from trex_fast.plan import make_plan


@pytest.fixture
def restore_flags():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.benchmark)
    yield
    matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.benchmark = saved


def test_policy_sets_ieee_matmuls_tf32_convolutions_and_cudnn_benchmark(restore_flags):
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the opposite of the policy
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark = False
    assert build.set_math_policy() == {"matmul_fp32": "ieee", "conv_fp32": "tf32",
                                       "cudnn_benchmark": True}
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.cudnn.benchmark is True
    # the legacy flags read the same policy
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True


def test_building_a_cpu_state_leaves_the_flags_alone(restore_flags, monkeypatch):
    calls = []
    monkeypatch.setattr(build, "set_math_policy", lambda: calls.append(1))
    tiny_state()
    assert calls == []


def test_building_a_cuda_state_applies_the_policy_first(monkeypatch):
    """build_state calls the policy before anything touches the device (the call is checked
    with a stand-in that stops the build, so no CUDA device is needed)."""
    class Stop(Exception):
        pass

    def policy():
        raise Stop

    monkeypatch.setattr(build, "set_math_policy", policy)
    with pytest.raises(Stop):
        cfg = tiny_config()
        build.build_state(cfg, make_plan(cfg, SINGLE, 5, 10, device="cuda"))
