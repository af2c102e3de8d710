"""GPU checks: the step on the device without host syncs, the fused kernel inside it, the
kernel at the production shape, and the multi-crop stage in bf16 at a production batch. Run
by tools/gpu_check.sh (`pytest -m gpu`).

Every test runs on two devices: "cuda" carries the `gpu` marker (skipped without CUDA, at the
sizes of a GPU run), "cpu" runs the same body at tiny sizes in CI (Triton in its interpreter),
so that an error of the body itself, such as crops in a dtype the state does not compute in,
shows on the CPU before a GPU window is spent on it.
"""
import pytest
import torch

from pipelines.spec import CropSpec, MultiCropSpec, multicrop_spec
from pipelines.stage.dispatch import GpuMultiCrop
from tests._multicrop_check import (
    MEAN_255,
    assert_close_255,
    assert_unbiased_255,
    emulate_hardware_tf32,
    smooth_canvas,
)
from tests.helpers import losses_by_impl, synthetic_batch
from trex_fast.availability import resolve_precision
from trex_fast.build import build_state
from trex_fast.config import make_config
from trex_fast.distributed import DistInfo
from trex_fast.kernels.dispatch import prototype_ce_with_top1
from trex_fast.kernels.shapes import PRODUCTION_DIM, PRODUCTION_SHAPES
from trex_fast.plan import COMPUTE_DTYPES, make_plan
from trex_fast.step import train_step

SINGLE = DistInfo(0, 1, 0, 1)
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"]
SIZES = {  # per device: a small GPU state, and a CPU one that steps in about a second
    "cuda": dict(arch="resnet18", batch_size=32, global_size=64, local_size=32, local_crops=4,
                 memory_size=256),
    "cpu": dict(arch="resnet18", batch_size=4, global_size=32, local_size=16, local_crops=2,
                memory_size=16, pr_hidden_dim=32, pr_bottleneck_dim=8),
}
NUM_CLASSES = {"cuda": 100, "cpu": 5}


def _state(device: str, **overrides):
    flags = dict(SIZES[device], warmup_epochs=0, device=device, channels_last=True)
    flags.update(overrides)
    cfg = make_config("trex", **flags)
    return build_state(cfg, make_plan(cfg, SINGLE, NUM_CLASSES[device], 100))


def _batch(cfg, seed=0):
    """A seeded synthetic batch on the config's device, in the dtype its state computes in
    (bf16 for precision=bf16, fp32 for fp32) and its memory format."""
    device = torch.device(cfg.device)
    dtype = COMPUTE_DTYPES[resolve_precision(cfg.precision, device)]  # as the plan does
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    b = synthetic_batch(cfg, num_classes=NUM_CLASSES[device.type], seed=seed)
    to = dict(device=device, dtype=dtype, memory_format=fmt)
    b.global_crops, b.local_crops = b.global_crops.to(**to), b.local_crops.to(**to)
    b.labels = b.labels.to(device)
    return b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_batch_is_in_the_compute_dtype_of_the_state(device, precision):
    state = _state(device, precision=precision)
    batch = _batch(state.cfg)
    assert batch.global_crops.dtype == batch.local_crops.dtype == COMPUTE_DTYPES[precision]
    assert batch.global_crops.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_impl", ["torch", "triton"])
def test_train_step_makes_no_host_sync(device, loss_impl):
    """On CUDA, steps under sync debug mode "error" (any host sync raises); on the CPU, where
    there is no such mode, the same steps run and must give a finite loss."""
    state = _state(device, loss_impl=loss_impl)
    batch = _batch(state.cfg)
    train_step(state, batch)  # warm-up: lazy inits, autotuning, kernel compilation
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3 if device == "cuda" else 1):
            train_step(state, batch)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(state.metrics.loss_sum).item()


@pytest.mark.parametrize("device", DEVICES)
def test_triton_and_torch_steps_agree(device):
    losses = losses_by_impl(lambda **kw: _state(device, precision="fp32", **kw), _batch)
    assert losses["torch"][0] == pytest.approx(losses["triton"][0], rel=1e-4)
    assert losses["torch"] == pytest.approx(losses["triton"], rel=1e-2)


@pytest.mark.parametrize("device,n,c,d", [
    pytest.param("cuda", *PRODUCTION_SHAPES[0], PRODUCTION_DIM, marks=pytest.mark.gpu,
                 id="cuda-production"),
    pytest.param("cpu", 72, 40, 32, id="cpu-tiny"),
])
def test_kernel_matches_reference(device, n, c, d):
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, d, device=device, generator=g).bfloat16().requires_grad_()
    w = torch.randn(c, d, device=device, generator=g)
    w[::20] = 0  # absent classes
    y = torch.randint(0, c, (n,), device=device, generator=g)
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


# ---------------------------------------------------------------- the multi-crop stage in bf16
MULTICROP = {  # per device: (images, canvas side, crop spec); cuda: a production batch
    "cuda": (256, 500, multicrop_spec(make_config("trex", batch_size=256))),
    "cpu": (3, 40, MultiCropSpec(CropSpec(1, 32, (0.25, 1.0), blur_p=0.5, solarize_p=0.5),
                                 CropSpec(2, 16, (0.05, 0.25), blur_p=0.5, solarize_p=0.0))),
}


@pytest.mark.parametrize("device", DEVICES)
def test_multicrop_stage_bf16_matches_torch_spec(device, monkeypatch):
    """The Triton multi-crop stage against its torch spec, bf16 channels-last output, with the
    CPU tests' bars (tests/_multicrop_check.py). On the CPU the GPU's tf32 dots are emulated."""
    if device == "cpu":
        emulate_hardware_tf32(monkeypatch)
    batch, side, spec = MULTICROP[device]
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(side // 2, side + 1, (batch, 2), generator=g).tolist()
    canvas, sizes = smooth_canvas([tuple(s) for s in sizes], seed=1, gray=(0,))
    canvas, sizes = canvas.to(device), sizes.to(device)
    labels = torch.arange(batch, device=device)
    out = {impl: GpuMultiCrop(spec, torch.device(device), torch.bfloat16, True, seed=5,
                              impl=impl)(canvas, sizes, labels, epoch=0, step=0)
           for impl in ("torch", "triton")}
    for name in ("global_crops", "local_crops"):
        ours, ref = getattr(out["triton"], name), getattr(out["torch"], name)
        assert ours.dtype == torch.bfloat16 and ours.is_contiguous(
            memory_format=torch.channels_last)
        assert_close_255(ours, ref, f"{device} {name}", mean_tol=MEAN_255[torch.bfloat16])
        assert_unbiased_255(ours, ref, f"{device} {name}")


# ---------------------------------------------------------------------------------------------
# The fused prototype CE on its production path: bf16 autocast, wgmma kernels (issue 22, item 5)
# ---------------------------------------------------------------------------------------------
AUTOCAST_CE_SHAPES = [  # (N rows, C classes, D): the training step's at batch 256, and a tiny one
    pytest.param("cuda", *PRODUCTION_SHAPES[0], PRODUCTION_DIM, marks=pytest.mark.gpu,
                 id="cuda-production"),
    pytest.param("cpu", 40, 23, 32, id="cpu-tiny"),
]
AUTOCAST_CE_GRAD_SCALE = 3.7  # a non-unit upstream gradient
AUTOCAST_CE_NEAR_TIE = 1e-3  # rows whose top-2 logits are closer than this may disagree


def _autocast_ce_inputs(device: str, n: int, c: int, d: int, learned: bool):
    """bf16 projector outputs z [n, d] and fp32 W [c, d] (prototypes with absent classes, or a
    learned classifier without), int64 labels [n]: what the bf16 training step passes."""
    g = torch.Generator(device=device).manual_seed(22)
    z = torch.randn(n, d, device=device, generator=g).bfloat16()
    weight = torch.randn(c, d, device=device, generator=g)
    if not learned:
        weight[::20] = 0.0  # absent classes: zero prototypes
    labels = torch.randint(0, c, (n,), device=device, generator=g)
    return z, weight, labels


def _autocast_ce_run(impl: str, z, weight, labels, learned: bool) -> dict:
    """Forward under bf16 autocast and (loss * scale).backward() for one loss impl."""
    z_leaf = z.clone().requires_grad_()
    w_leaf = weight.clone().requires_grad_(learned)
    with torch.autocast(z.device.type, dtype=torch.bfloat16):
        loss, correct = prototype_ce_with_top1(z_leaf, w_leaf, labels, 0.1, impl)
    (loss * AUTOCAST_CE_GRAD_SCALE).backward()
    return dict(loss=loss.detach(), correct=correct, grad_z=z_leaf.grad, grad_w=w_leaf.grad)


def _top2_gap(z, weight) -> torch.Tensor:
    """Gap between each row's two largest cosine logits of the bf16-rounded operands [N]."""
    zn = torch.nn.functional.normalize(z.double(), dim=1)
    wn = torch.nn.functional.normalize(weight.bfloat16().double(), dim=1)
    top = (zn @ wn.t() / 0.1).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def _rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    return ((value.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("device,n,c,d", AUTOCAST_CE_SHAPES)
@pytest.mark.parametrize("learned", [False, True], ids=["prototypes", "learned"])
def test_autocast_prototype_ce_matches_the_torch_reference(device, n, c, d, learned):
    """The bf16 autocast path of the fused kernel (bf16 dot operands: wgmma on an H100) against
    trex_fast.losses' torch reference, forward and backward with a non-unit upstream gradient.
    The reference rounds the operands as the kernel does and computes in fp32, so the loss
    agrees to fp32 summation order; gradients to bf16 storage (the kernel's backward dots take
    bf16 dlogits, tests/unit/test_prototype_ce_kernel.py's bound); top-1 wherever no near-tie."""
    from trex_fast.kernels.prototype_ce import dot_dtype_for

    z, weight, labels = _autocast_ce_inputs(device, n, c, d, learned)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert dot_dtype_for(z, weight) == torch.bfloat16  # the 16-bit (wgmma) kernels
    ref = _autocast_ce_run("torch", z, weight, labels, learned)
    out = _autocast_ce_run("triton", z, weight, labels, learned)
    assert out["loss"].dtype == ref["loss"].dtype == torch.float32
    assert _rel_err(out["loss"], ref["loss"]) <= 1e-5
    clear = _top2_gap(z, weight) > AUTOCAST_CE_NEAR_TIE
    assert clear.float().mean() > 0.9
    assert torch.equal(out["correct"][clear], ref["correct"][clear])
    assert out["grad_z"].dtype == ref["grad_z"].dtype == torch.bfloat16
    assert _rel_err(out["grad_z"], ref["grad_z"]) <= 2.5e-2
    if learned:
        assert out["grad_w"].dtype == ref["grad_w"].dtype == torch.float32
        assert _rel_err(out["grad_w"], ref["grad_w"]) <= 2.5e-2
    else:
        assert out["grad_w"] is None and ref["grad_w"] is None
