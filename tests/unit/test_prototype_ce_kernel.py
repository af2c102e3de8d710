"""Fused prototype cross-entropy kernel (issue 6) against the plain-torch specification.

Runs the Triton kernels on CUDA when present, else on CPU through the Triton interpreter
(TRITON_INTERPRET=1 must be set before the kernel module is imported, hence the top lines).
The reference is `logits = normalize(z) @ normalize(W).T / tau; F.cross_entropy` evaluated in
float64 on the same (already rounded) inputs, so the bounds below measure the kernel's own error.

Bounds (max |kernel - reference| / max |reference|, i.e. relative to the tensor's scale):
    dtype      loss    grad z, grad W   why
    float32    1e-5    1e-5             fp32 products and accumulation, no TF32
    bfloat16   1e-5    2.5e-2           products of bf16 inputs are exact in fp32; gradients go
                                        through bf16 dot operands and are stored in bf16 (2^-8)
    float16    1e-5    4e-3             same, with fp16's 2^-11 rounding
Measured under the CPU interpreter: fp32 ~3e-7; bf16 ~1e-2 (production shape 1.2e-2, against a
floor of 3.4e-3 from storing the float64 gradient in bf16); fp16 ~5e-4; losses ~5e-8.

Issue 14: several class splits (the forward's second grid axis and dL/dz's partial sums) give
what one split gives; the production launch plan has wgmma-shaped tiles and fills an H100;
and loss_impl='torch' and 'triton' agree under autocast (the same operand rounding).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from trex_fast.kernels import prototype_ce  # noqa: E402
from trex_fast.kernels.dispatch import prototype_ce_with_top1, prototype_cross_entropy  # noqa: E402
from trex_fast.kernels.prototype_ce import (  # noqa: E402
    BlockConfig,
    dot_dtype_for,
    fused_prototype_ce,
    plan_launch,
)
from trex_fast.kernels.shapes import PRODUCTION_DIM, PRODUCTION_SHAPES  # noqa: E402
from trex_fast.losses import torch_prototype_ce_with_top1  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TAU = 0.1  # RECIPE.md
GRAD_SCALE = 3.7  # a non-unit upstream gradient: (loss * 3.7).backward()
SMALL_BLOCKS = BlockConfig(block_n=16, block_c=16, num_warps=4)  # many tiles, ragged last ones
BOUNDS = {  # dtype: (loss, gradients), see the module docstring
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 2.5e-2),
    torch.float16: (1e-5, 4e-3),
}
NEAR_TIE = 1e-3  # rows whose top-2 reference logits are closer than this are not compared


def make_inputs(n: int, c: int, d: int, dtype: torch.dtype, seed: int = 0,
                zero_classes: tuple[int, ...] = ()):
    """z [n, d], prototypes [c, d] (rows in zero_classes set to 0: absent classes), labels [n]."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    weight = torch.randn(c, d, generator=gen)
    weight[list(zero_classes)] = 0.0
    labels = torch.randint(0, c, (n,), generator=gen)
    return z.to(DEVICE, dtype), weight.to(DEVICE, dtype), labels.to(DEVICE)


def reference64(z, weight, labels, tau=TAU, grad_scale=GRAD_SCALE, weight_grad=True) -> dict:
    """The specification in float64: loss, correct, gradients and the top-2 logit gap."""
    z64 = z.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_(weight_grad)
    logits = F.normalize(z64, dim=1) @ F.normalize(w64, dim=1).t() / tau  # [N, C]
    loss = F.cross_entropy(logits, labels)
    (loss * grad_scale).backward()
    top = logits.detach().topk(min(2, logits.shape[1]), dim=1).values  # [N, <=2]
    gap = top[:, 0] - top[:, -1] if top.shape[1] == 2 else torch.full_like(top[:, 0], math.inf)
    return dict(loss=loss.detach(), correct=logits.argmax(dim=1) == labels,
                grad_z=z64.grad, grad_w=w64.grad, gap=gap)


def run_kernel(z, weight, labels, tau=TAU, grad_scale=GRAD_SCALE, weight_grad=True,
               blocks: BlockConfig | None = SMALL_BLOCKS) -> dict:
    """Forward + backward through the fused kernel; asserts that no input was modified."""
    z_leaf = z.clone().requires_grad_()
    w_leaf = weight.clone().requires_grad_(weight_grad)
    before = (z_leaf.detach().clone(), w_leaf.detach().clone(), labels.clone())
    loss, correct = fused_prototype_ce(z_leaf, w_leaf, labels, tau, blocks=blocks)
    (loss * grad_scale).backward()
    for original, now in zip(before, (z_leaf.detach(), w_leaf.detach(), labels), strict=True):
        assert torch.equal(original, now), "the kernel modified an input"
    return dict(loss=loss.detach(), correct=correct, grad_z=z_leaf.grad, grad_w=w_leaf.grad)


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref| (0 when both are all zero)."""
    err = (value.double() - ref.double()).abs().max().item()
    return err / max(ref.double().abs().max().item(), 1e-30)


def assert_matches(out: dict, ref: dict, dtype: torch.dtype, weight_grad: bool = True) -> None:
    loss_bound, grad_bound = BOUNDS[dtype]
    assert out["loss"].dtype == torch.float32 and out["loss"].shape == ()
    assert rel_err(out["loss"], ref["loss"]) <= loss_bound
    assert out["correct"].dtype == torch.bool
    clear = ref["gap"] > NEAR_TIE
    assert clear.float().mean() > 0.9, "test data has too many near-ties"
    assert torch.equal(out["correct"][clear], ref["correct"][clear])
    assert out["grad_z"].dtype == dtype
    assert rel_err(out["grad_z"], ref["grad_z"]) <= grad_bound
    if weight_grad:
        assert out["grad_w"].dtype == dtype
        assert rel_err(out["grad_w"], ref["grad_w"]) <= grad_bound
    else:
        assert out["grad_w"] is None


@pytest.mark.parametrize("n,c,d", [(45, 21, 37), (33, 1, 37), (1, 70, 19), (64, 48, 16)])
def test_matches_float64_reference_at_odd_shapes(n, c, d):
    z, weight, labels = make_inputs(n, c, d, torch.float32, zero_classes=(0,) if c > 1 else ())
    out = run_kernel(z, weight, labels)
    if c > 1:
        assert_matches(out, reference64(z, weight, labels), torch.float32)
        return
    # One class: loss and gradients are exactly 0 in the reference, so compare absolutely (the
    # backward's recomputed logits may differ from the forward's by an ulp).
    assert out["loss"].abs() <= 1e-6 and bool(out["correct"].all())
    assert out["grad_z"].abs().max() <= 1e-6 and out["grad_w"].abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["prototypes", "learned"])
def test_low_precision_bounds(dtype, weight_grad):
    # Absent classes only for prototypes (no W gradient): dL/dW of a zero row is g / 1e-12,
    # which no 16-bit float holds (the reference gives inf in fp16 too).
    zero_classes = () if weight_grad else (3, 36)
    z, weight, labels = make_inputs(70, 37, 37, dtype, seed=1, zero_classes=zero_classes)
    out = run_kernel(z, weight, labels, weight_grad=weight_grad)
    ref = reference64(z, weight, labels, weight_grad=weight_grad)
    assert_matches(out, ref, dtype, weight_grad=weight_grad)


def test_mixed_dtypes_compute_in_the_promoted_dtype():
    """bf16 projector outputs against fp32 prototypes: what the autocast training step passes."""
    z, _, labels = make_inputs(40, 23, 37, torch.bfloat16, seed=2)
    _, weight, _ = make_inputs(40, 23, 37, torch.float32, seed=2)
    out = run_kernel(z, weight, labels, weight_grad=False)
    ref = reference64(z, weight, labels, weight_grad=False)
    assert rel_err(out["loss"], ref["loss"]) <= BOUNDS[torch.float32][0]
    assert out["grad_z"].dtype == torch.bfloat16
    assert rel_err(out["grad_z"], ref["grad_z"]) <= BOUNDS[torch.bfloat16][1]


def test_autocast_runs_the_dots_in_the_autocast_dtype():
    """Under autocast, fp32 inputs are dotted in bf16 on chip (as torch.matmul would be), with
    norms and accumulation in fp32: bf16-level agreement, and not the fp32 path's result."""
    z, weight, labels = make_inputs(45, 21, 37, torch.float32, seed=10)
    exact = run_kernel(z, weight, labels)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert dot_dtype_for(z, weight) == torch.bfloat16
        out = run_kernel(z, weight, labels)
    ref = reference64(z, weight, labels)
    assert out["loss"] != exact["loss"]
    assert rel_err(out["loss"], ref["loss"]) <= 1e-2
    assert out["grad_z"].dtype == torch.float32
    assert rel_err(out["grad_z"], ref["grad_z"]) <= BOUNDS[torch.bfloat16][1]
    assert rel_err(out["grad_w"], ref["grad_w"]) <= BOUNDS[torch.bfloat16][1]


def test_production_shape():
    """The first production shape (N = 9 crops x 256 images, C = ImageNet-1K's classes,
    D = PRODUCTION_DIM), bf16, every 20th class absent.

    On CPU the interpreter runs 256 x 256 tiles (the CPU default), so each kernel takes only
    9 x 4 tile iterations; on CUDA the GPU defaults are used.
    """
    (n, c), d = PRODUCTION_SHAPES[0], PRODUCTION_DIM
    z, weight, labels = make_inputs(n, c, d, torch.bfloat16, seed=3,
                                    zero_classes=tuple(range(0, c, 20)))
    out = run_kernel(z, weight, labels, blocks=None, weight_grad=False)
    ref = reference64(z, weight, labels, weight_grad=False)
    assert_matches(out, ref, torch.bfloat16, weight_grad=False)
    # The plain preset's learned classifier: W gets a gradient (no zero rows there).
    weight = make_inputs(1, 1000, 256, torch.bfloat16, seed=4)[1]
    out = run_kernel(z, weight, labels, blocks=None)
    assert_matches(out, reference64(z, weight, labels), torch.bfloat16)


def test_zero_prototypes_give_zero_logits():
    """All classes absent: every logit is exactly 0, so loss = log(C), argmax = class 0 (torch's
    first-index tie-break) and dL/dz = 0; dL/dW follows F.normalize's eps branch (g / eps)."""
    z, weight, labels = make_inputs(30, 17, 37, torch.float32, seed=4)
    weight = torch.zeros_like(weight)
    out = run_kernel(z, weight, labels)
    ref = reference64(z, weight, labels)
    assert rel_err(out["loss"], torch.tensor(math.log(17))) <= 1e-6
    assert torch.equal(out["correct"], labels == 0)
    assert torch.count_nonzero(out["grad_z"]) == 0
    assert rel_err(out["grad_w"], ref["grad_w"]) <= 1e-5


def test_weight_without_requires_grad_gets_no_gradient():
    z, weight, labels = make_inputs(45, 21, 37, torch.float32, seed=5, zero_classes=(4,))
    out = run_kernel(z, weight, labels, weight_grad=False)
    assert_matches(out, reference64(z, weight, labels, weight_grad=False), torch.float32,
                   weight_grad=False)


def test_upstream_gradient_scales_both_gradients():
    z, weight, labels = make_inputs(45, 21, 37, torch.float32, seed=6)
    unit = run_kernel(z, weight, labels, grad_scale=1.0)
    scaled = run_kernel(z, weight, labels, grad_scale=GRAD_SCALE)
    assert rel_err(scaled["grad_z"], GRAD_SCALE * unit["grad_z"]) <= 1e-6
    assert rel_err(scaled["grad_w"], GRAD_SCALE * unit["grad_w"]) <= 1e-6


def test_weight_grad_splits_agree():
    """The split reduction over row blocks (used on GPU) matches the single pass."""
    z, weight, labels = make_inputs(100, 21, 37, torch.float32, seed=7)
    split = BlockConfig(block_n=16, block_c=16, num_warps=4, weight_grad_splits=3)
    single = BlockConfig(block_n=16, block_c=16, num_warps=4, weight_grad_splits=1)
    a = run_kernel(z, weight, labels, blocks=split)
    b = run_kernel(z, weight, labels, blocks=single)
    assert rel_err(a["grad_w"], b["grad_w"]) <= 1e-6


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_class_splits_match_one_split(splits):
    """The forward's class chunks (grid axis 1) merged by lse, argmax and target, and dL/dz's
    per-chunk partial sums, give what one chunk gives. 70 classes in 16-class tiles: 2, 3 and
    5 splits are chunks of 48, 32 and 16 classes, the last one ragged."""
    z, weight, labels = make_inputs(45, 70, 37, torch.float32, seed=11, zero_classes=(5, 50))
    one = run_kernel(z, weight, labels, blocks=BlockConfig(16, 16, class_splits=1))
    blocks = BlockConfig(16, 16, class_splits=splits)
    assert plan_launch(45, 70, 37, blocks, sms=None).class_splits == splits
    many = run_kernel(z, weight, labels, blocks=blocks)
    assert rel_err(many["loss"], one["loss"]) <= 1e-6
    assert torch.equal(many["correct"], one["correct"])
    assert rel_err(many["grad_z"], one["grad_z"]) <= 1e-6
    assert rel_err(many["grad_w"], one["grad_w"]) <= 1e-6
    assert_matches(many, reference64(z, weight, labels), torch.float32)


def test_grad_z_with_other_class_chunks_than_the_forward(monkeypatch):
    """Issue 22, item 8: dL/dz has class chunks of its own (sized for its fewer programs per
    SM). With 3 SMs, 4 forward and 1 gradient program per SM, 45 rows x 70 classes in 16-wide
    tiles split 3 ways in the forward and not at all in dL/dz; the result is the reference's."""
    monkeypatch.setattr(prototype_ce, "_sm_count", lambda device: 3)
    blocks = BlockConfig(16, 16, programs_per_sm=4, grad_programs_per_sm=1)
    plan = plan_launch(45, 70, 37, blocks, sms=3)
    assert (plan.class_splits, plan.grad_class_splits) == (3, 1)
    z, weight, labels = make_inputs(45, 70, 37, torch.float32, seed=15, zero_classes=(9,))
    out = run_kernel(z, weight, labels, blocks=blocks)
    assert_matches(out, reference64(z, weight, labels), torch.float32)


def test_class_splits_keep_the_first_index_of_a_tie():
    """Classes 3 and 40 have the same prototype, in different chunks (32-class chunks with 3
    splits). Rows near that prototype have both as their top logit, so torch's argmax (the
    first index) is 3: rows labelled 3 are correct, rows labelled 40 are not."""
    z, weight, labels = make_inputs(32, 70, 37, torch.float32, seed=12)
    weight[40] = weight[3]
    z[:16] = weight[3] + 0.01 * z[:16]  # [16, D]: top class 3 == 40
    labels[:8], labels[8:16] = 3, 40
    for splits in (1, 3):
        _, correct = fused_prototype_ce(z, weight, labels, TAU,
                                        blocks=BlockConfig(16, 16, class_splits=splits))
        assert correct[:8].all() and not correct[8:16].any(), splits
    _, expected = torch_prototype_ce_with_top1(z, weight, labels, TAU)
    assert torch.equal(correct, expected)


def test_production_launch_fills_an_h100_with_wgmma_tiles():
    """Item 9 of issue 14: on CUDA, 16-bit operands get 64-row tiles and 4 or 8 warps (wgmma
    needs a warpgroup, M >= 64), and no class chunk is empty. Item 8 of issue 22: the grids
    fill whole waves of resident programs (2 forward programs per SM, 1 gradient program) or
    nearly: at N=2304 the forward was 288 programs at one per SM, 3 waves with the last 18%
    full; now one wave that gives every SM work, and dL/dz and dL/dW one wave of one per SM
    each (dL/dz with class chunks of its own)."""
    blocks = prototype_ce._block_config(torch.bfloat16, 256, "cuda")
    assert blocks.block_n >= 64 and blocks.block_c >= 64
    assert blocks.num_warps in (4, 8) and blocks.grad_num_warps in (4, 8)
    sms = 132
    for n, c in PRODUCTION_SHAPES:
        plan = plan_launch(n, c, PRODUCTION_DIM, blocks, sms=sms)
        for programs, resident in ((plan.row_blocks * plan.class_splits, blocks.programs_per_sm),
                                   (plan.row_blocks * plan.grad_class_splits,
                                    blocks.grad_programs_per_sm),
                                   (plan.class_blocks * plan.weight_grad_splits,
                                    blocks.grad_programs_per_sm)):
            slots = sms * resident
            waves = programs / slots
            assert math.ceil(waves) - waves <= 0.2 or waves > 2, (n, c, programs, slots)
        for chunk, splits in ((plan.class_chunk, plan.class_splits),
                              (plan.grad_class_chunk, plan.grad_class_splits)):
            assert chunk % blocks.block_c == 0
            assert (splits - 1) * chunk < c <= splits * chunk  # no empty chunk
    (n, c), (big_n, big_c) = PRODUCTION_SHAPES
    plan = plan_launch(n, c, PRODUCTION_DIM, blocks, sms=sms)
    assert sms <= plan.row_blocks * plan.class_splits <= sms * blocks.programs_per_sm
    assert 0.8 * sms <= plan.row_blocks * plan.grad_class_splits <= sms  # dL/dz: 108
    assert 0.9 * sms <= plan.class_blocks * plan.weight_grad_splits <= sms
    # the large shape fills the GPU unsplit: no partials
    big = plan_launch(big_n, big_c, PRODUCTION_DIM, blocks, sms=sms)
    assert big.class_splits == big.grad_class_splits == big.weight_grad_splits == 1


def test_wave_splits_minimise_whole_waves():
    """_wave_splits against a brute force of its cost model, and the example of issue 22:
    36 row blocks x 16 class blocks on 132 one-program SMs take 3 waves of 2 blocks at 8
    splits (the old rule's choice) but 1 wave of 6 blocks at 3 splits (7 < 3 x 3 units)."""
    assert prototype_ce._wave_splits(None, 36, 16, 132) == 3
    assert prototype_ce._wave_cost(36, 3, 16, 132) < prototype_ce._wave_cost(36, 8, 16, 132)
    assert prototype_ce._wave_splits(None, 36, 16, 264) == 6  # two per SM: 216 programs
    assert prototype_ce._wave_splits(5, 36, 16, 132) == 5  # a requested count is kept
    assert prototype_ce._wave_splits(None, 36, 16, None) == 1  # CPU
    for other, most, slots in ((36, 16, 264), (16, 36, 132), (144, 63, 528), (7, 40, 100)):
        best = min(prototype_ce._wave_cost(other, math.ceil(most / k), most, slots)
                   for k in range(1, most + 1)
                   if other * math.ceil(most / k) <= prototype_ce._MAX_SPLIT_WAVES * slots)
        chosen = prototype_ce._wave_splits(None, other, most, slots)
        assert prototype_ce._wave_cost(other, chosen, most, slots) == best


def test_prototypes_are_rounded_once_per_call(monkeypatch):
    """Under bf16 autocast, fp32 prototypes reach the forward kernel as one bf16 copy (a cast
    per call, not one per program), and the norms come from the fp32 values."""
    seen = []
    real = prototype_ce._forward_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args[0].dtype, args[1].dtype))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(prototype_ce, "_forward_kernel", Spy())
    z, _, labels = make_inputs(40, 23, 37, torch.bfloat16, seed=13)
    _, weight, _ = make_inputs(40, 23, 37, torch.float32, seed=13)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        fused_prototype_ce(z, weight, labels, TAU, blocks=SMALL_BLOCKS)
    assert seen == [(torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("weight_grad", [False, True], ids=["prototypes", "learned"])
def test_torch_and_triton_impls_agree_under_autocast(weight_grad):
    """Item 11 of issue 14: inside the training step's bf16 autocast (here CPU autocast), bf16
    projector outputs against fp32 prototypes or classifier weights give the same loss, top-1
    and gradients with loss_impl='torch' and 'triton': the reference rounds the operands as the
    kernel does and computes the logits in fp32 with autocast off. Normalising first and letting
    autocast run the matmul in bf16 (the reference before) is off by far more than the bound."""
    z, _, labels = make_inputs(70, 37, 37, torch.bfloat16, seed=14)
    _, weight, _ = make_inputs(70, 37, 37, torch.float32, seed=14)
    out = {}
    for impl in ("torch", "triton"):
        z_leaf = z.clone().requires_grad_()
        w_leaf = weight.clone().requires_grad_(weight_grad)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss, correct = prototype_ce_with_top1(z_leaf, w_leaf, labels, TAU, impl=impl)
        (loss * GRAD_SCALE).backward()
        out[impl] = dict(loss=loss.detach(), correct=correct, grad_z=z_leaf.grad,
                         grad_w=w_leaf.grad)
    ref, fused = out["torch"], out["triton"]
    assert ref["loss"].dtype == fused["loss"].dtype == torch.float32
    assert rel_err(fused["loss"], ref["loss"]) <= 1e-6
    assert torch.equal(fused["correct"], ref["correct"])
    assert fused["grad_z"].dtype == ref["grad_z"].dtype == torch.bfloat16
    # The kernel's backward dots take bf16 dlogits, the reference's fp32 ones (measured on
    # CPU: 8e-3, 1 to 2 bf16 ulps of the largest element, the gradient being stored in bf16).
    assert rel_err(fused["grad_z"], ref["grad_z"]) <= BOUNDS[torch.bfloat16][1]
    if weight_grad:
        assert rel_err(fused["grad_w"], ref["grad_w"]) <= BOUNDS[torch.bfloat16][1]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        naive = F.normalize(z.float(), dim=1) @ F.normalize(weight, dim=1).t() / TAU
        assert naive.dtype == torch.bfloat16  # autocast ran this matmul in bf16
        naive_loss = F.cross_entropy(naive.float(), labels)
    assert rel_err(naive_loss, ref["loss"]) > 10 * 1e-6  # measured: 1e-4


def test_strided_inputs():
    """z as a column slice of a wider tensor (row stride != D) and W as a transposed view."""
    z_wide, _, labels = make_inputs(45, 21, 50, torch.float32, seed=8)
    _, weight, _ = make_inputs(45, 21, 37, torch.float32, seed=8)
    z = z_wide[:, :37]
    weight_t = weight.t().contiguous().t()  # same values, column-major
    out = run_kernel(z, weight_t, labels)
    assert_matches(out, reference64(z, weight, labels), torch.float32)


def test_losses_module_torch_and_triton_agree():
    """trex_fast.losses with impl='torch' (reference, fp32 here) and impl='triton'."""
    z, weight, labels = make_inputs(45, 21, 37, torch.float32, seed=9, zero_classes=(2,))
    grads = {}
    for impl in ("torch", "triton"):
        z_leaf = z.clone().requires_grad_()
        w_leaf = weight.clone().requires_grad_()
        loss = prototype_cross_entropy(z_leaf, w_leaf, labels, TAU, impl=impl)
        (loss * GRAD_SCALE).backward()
        _, correct = prototype_ce_with_top1(z, weight, labels, TAU, impl=impl)
        grads[impl] = (loss.detach(), correct, z_leaf.grad, w_leaf.grad)
    ref, fused = grads["torch"], grads["triton"]
    assert rel_err(fused[0], ref[0]) <= 1e-5
    assert torch.equal(fused[1], ref[1])
    assert rel_err(fused[2], ref[2]) <= 1e-5
    assert rel_err(fused[3], ref[3]) <= 1e-5


def test_rejects_bad_inputs():
    z, weight, labels = make_inputs(8, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="labels"):
        fused_prototype_ce(z, weight, labels.int(), TAU)
    with pytest.raises(ValueError, match="weight"):
        fused_prototype_ce(z, weight[:, :15], labels, TAU)
    with pytest.raises(TypeError, match="dtype"):
        fused_prototype_ce(z.double(), weight, labels, TAU)
    with pytest.raises(ValueError, match="block_n"):
        BlockConfig(block_n=24)
