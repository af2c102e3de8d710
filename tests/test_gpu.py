"""GPU checks (skipped without CUDA): the step on the device without host syncs, the fused
kernel inside it, and the kernel at the production shape. Run by tools/gpu_check.sh."""
import pytest
import torch

from tests.helpers import losses_by_impl, synthetic_batch
from trex_fast.build import build_state
from trex_fast.config import make_config
from trex_fast.distributed import DistInfo
from trex_fast.losses import prototype_ce_with_top1
from trex_fast.step import train_step

pytestmark = pytest.mark.gpu
SINGLE = DistInfo(0, 1, 0, 1)


def _cuda_state(**overrides):
    flags = dict(arch="resnet18", batch_size=32, global_size=64, local_size=32, local_crops=4,
                 memory_size=256, warmup_epochs=0, device="cuda", precision="bf16",
                 channels_last=True)
    flags.update(overrides)
    cfg = make_config("trex", **flags)
    return build_state(cfg, 100, 100, torch.device("cuda"), SINGLE)


def _cuda_batch(cfg, seed=0):
    b = synthetic_batch(cfg, num_classes=100, seed=seed)
    to = dict(device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
    b.global_crops, b.local_crops = b.global_crops.to(**to), b.local_crops.to(**to)
    b.labels = b.labels.cuda()
    return b


@pytest.mark.parametrize("loss_impl", ["torch", "triton"])
def test_train_step_makes_no_host_sync(loss_impl):
    state = _cuda_state(loss_impl=loss_impl)
    batch = _cuda_batch(state.cfg)
    train_step(state, batch)  # warm-up: lazy inits, autotuning, kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(state, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(state.metrics.loss_sum).item()


def test_triton_and_torch_steps_agree_on_cuda():
    losses = losses_by_impl(lambda **kw: _cuda_state(precision="fp32", **kw), _cuda_batch)
    assert losses["torch"][0] == pytest.approx(losses["triton"][0], rel=1e-4)
    assert losses["torch"] == pytest.approx(losses["triton"], rel=1e-2)


def test_kernel_matches_reference_at_production_shape():
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(2304, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    w = torch.randn(1000, 256, device="cuda", generator=g)
    w[::20] = 0  # absent classes
    y = torch.randint(0, 1000, (2304,), device="cuda", generator=g)
    out = {}
    for impl in ("torch", "triton"):
        z.grad = None
        loss, correct = prototype_ce_with_top1(z, w, y, 0.1, impl)
        (2.5 * loss).backward()
        out[impl] = (loss.detach(), correct, z.grad.float())
    assert torch.allclose(out["torch"][0], out["triton"][0], rtol=1e-3)
    assert (out["torch"][1] == out["triton"][1]).float().mean() > 0.995  # bf16 near-ties
    err = (out["torch"][2] - out["triton"][2]).abs().max() / out["torch"][2].abs().max()
    assert err < 3e-2
