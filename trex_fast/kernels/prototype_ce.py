"""Fused prototype cross-entropy (issues 6 and 14): cosine logits, online log-sum-exp, top-1.

Computes, for projector outputs z [N, D], class prototypes or cosine-classifier weights W [C, D],
labels y [N] and temperature tau, the values of the plain-torch specification
`trex_fast.losses.torch_prototype_ce_with_top1`, with its numerics (trex_fast/losses.py):

    logits = <z~, w~> / (max(||z||, eps) * max(||w||, eps) * tau)  # [N, C] fp32, never stored
    loss = mean_i (logsumexp_c logits[i] - logits[i, y_i])         # fp32 scalar
    correct = argmax_c logits[i] == y_i                             # bool [N], first index

z~ and w~ are z and W rounded to the dots' operand dtype (`dot_operand_dtype`); the launcher
rounds them once per call, e.g. the fp32 prototypes to bf16 under autocast (one [C, D] cast per
step, not one per program). Norms come from the unrounded inputs, products accumulate in fp32.

Work split (issue 14, item 9). The forward tiles the rows of z by BLOCK_N and cuts the classes
into contiguous chunks along a second grid axis, so that the production N = 2304 fills a
132-SM GPU; the split counts fill whole waves of the programs an SM holds at once, dL/dz
with class chunks of its own (issue 22, item 8: `plan_launch`). Each program keeps, per row
and over its chunk, a running max, a sum of exponentials (flash-attention style), the target
logit and the first argmax; a merge kernel
combines chunk s's (m_s, l_s): lse = M + log(sum_s l_s * exp(m_s - M)) with M = max_s m_s;
argmax = the lowest index among the chunks that reach M; target = the sum over chunks (0 off
the label's chunk). The backward recomputes the logit tiles: dL/dz per (row block, class chunk)
and dL/dW per (class block, row-block group) go to fp32 partial sums that one finish kernel
reduces in a fixed order and chains through the normalisation: deterministic, no atomics.
Extra memory: O(N + C) statistics and O((N + C) * D * splits) fp32 partial sums; no N x C.

A zero row of W (a class absent from the memory bank) gives a logit of exactly 0 (F.normalize
semantics: x / max(||x||, 1e-12)). Kernels never write their inputs and never synchronise with
the host: the upstream gradient is read from device memory inside the backward kernels.
`aot_kernels()` lists the production launch configurations for tools/aot_check.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from trex_fast.kernels.shapes import PRODUCTION_DIM, PRODUCTION_SHAPES, shape_label
from trex_fast.losses import NORM_EPS, dot_operand_dtype

_NO_CLASS = tl.constexpr(2**31 - 1)  # above any class index: neutral for the argmax's min
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ---------------------------------------------------------------------------------------------
# Shared device functions
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptr, rows, row_ok, feats, dim, stride):
    """Rows of a [*, dim] matrix with unit column stride, zero-padded to [len(rows), BLOCK_D].

    Zero padding of the feature axis leaves dot products and norms unchanged.
    """
    offsets = rows.to(tl.int64)[:, None] * stride + feats[None, :]
    return tl.load(ptr + offsets, mask=row_ok[:, None] & (feats < dim)[None, :], other=0.0)


@triton.jit
def _dot_operand(x, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the dot's operand dtype. UPCAST (set under TRITON_INTERPRET=1 only) carries
    the rounded values in fp32, because the interpreter multiplies bf16 tiles as their raw
    uint16 bits; the products and the fp32 accumulation are then the same as on the GPU."""
    x = x.to(DOT_DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _cosine_logits(a_tile, b_tile, a_scale, b_scale, DOT_PRECISION: tl.constexpr):
    """Logit tile [A, B] = <a, b> * a_scale * b_scale, products accumulated in fp32.

    For rows of z against classes: a_scale [A] = 1 / (max(||z||, eps) * tau), b_scale [B] =
    1 / max(||w||, eps); the transposed tile swaps the roles.
    """
    raw = tl.dot(a_tile, tl.trans(b_tile), input_precision=DOT_PRECISION)  # [A, B] fp32
    return raw * a_scale[:, None] * b_scale[None, :]


@triton.jit
def _normalize_backward(grad_hat, radial, x, norm, eps):
    """Gradient wrt raw rows x [R, BD] of x / max(||x||, eps), given grad_hat [R, BD] (fp32), the
    gradient wrt the normalised rows, and radial = <grad_hat, x_hat> [R].

    Where ||x|| >= eps: (g - x_hat <g, x_hat>) / ||x||. Below eps the denominator is the
    constant eps (torch's clamp_min passes no gradient to the norm there): g / eps.
    """
    inv = 1.0 / tl.maximum(norm, eps)  # [R]
    radial = tl.where(norm >= eps, radial * inv, 0.0)  # x_hat = x * inv folds one inv in here
    return (grad_hat - x.to(tl.float32) * radial[:, None]) * inv[:, None]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _row_norm_kernel(x_ptr, norm_ptr, n_rows, dim, stride_x,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """norm[r] = ||x[r]||_2 in fp32, for BLOCK_R rows per program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x = _load_rows(x_ptr, rows, row_ok, tl.arange(0, BLOCK_D), dim, stride_x).to(tl.float32)
    tl.store(norm_ptr + rows, tl.sqrt(tl.sum(x * x, axis=1)), mask=row_ok)


@triton.jit
def _forward_kernel(z_ptr, w_ptr, z_norm_ptr, w_norm_ptr, labels_ptr, stats_ptr, best_ptr,
                    n_rows, n_classes, dim, stride_z, stride_w, chunk, inv_tau, eps,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (i, s): BLOCK_N rows of z against the classes [s * chunk, (s + 1) * chunk).

    z and w are the rounded dot operands. Writes the chunk's per-row statistics: stats
    [3, S, N] fp32 = (max logit, sum of exp(logit - max), target logit or 0 when the label is
    in another chunk) and best [S, N] int32, the first index of the max.
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    dot_dtype = z_ptr.dtype.element_ty
    z_tile = _dot_operand(_load_rows(z_ptr, rows, row_ok, feats, dim, stride_z), dot_dtype,
                          UPCAST)  # [BN, BD]
    z_norm = tl.load(z_norm_ptr + rows, mask=row_ok, other=1.0)
    row_scale = inv_tau / tl.maximum(z_norm, eps)  # [BN]
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)  # [BN] int64

    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max == best logit so far
    run_sum = tl.zeros([BLOCK_N], tl.float32)  # sum of exp(logit - run_max)
    target = tl.zeros([BLOCK_N], tl.float32)  # logit of the label's class
    best = tl.zeros([BLOCK_N], tl.int32)  # first index of the running max
    c_end = tl.minimum(split * chunk + chunk, n_classes)
    for c0 in range(split * chunk, c_end, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        class_ok = classes < c_end
        w_tile = _dot_operand(_load_rows(w_ptr, classes, class_ok, feats, dim, stride_w),
                              dot_dtype, UPCAST)  # [BC, BD]
        w_inv_norm = 1.0 / tl.maximum(tl.load(w_norm_ptr + classes, mask=class_ok, other=1.0), eps)
        logits = _cosine_logits(z_tile, w_tile, row_scale, w_inv_norm, DOT_PRECISION)
        logits = tl.where(class_ok[None, :], logits, float("-inf"))  # [BN, BC]

        tile_max = tl.max(logits, axis=1)  # [BN]
        is_max = logits == tile_max[:, None]
        tile_arg = tl.min(tl.where(is_max, classes[None, :], _NO_CLASS), axis=1)
        best = tl.where(tile_max > run_max, tile_arg, best)  # strict: earlier tiles win ties
        new_max = tl.maximum(run_max, tile_max)
        tile_sum = tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_sum = run_sum * tl.exp(run_max - new_max) + tile_sum
        run_max = new_max
        is_target = classes[None, :] == labels[:, None]
        target += tl.sum(tl.where(is_target, logits, 0.0), axis=1)

    out = split * n_rows + rows  # [BN] index into [S, N]
    plane = tl.num_programs(1) * n_rows  # elements per statistic
    tl.store(stats_ptr + out, run_max, mask=row_ok)
    tl.store(stats_ptr + plane + out, run_sum, mask=row_ok)
    tl.store(stats_ptr + 2 * plane + out, target, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)


@triton.jit
def _merge_kernel(stats_ptr, best_ptr, labels_ptr, lse_ptr, loss_ptr, correct_ptr,
                  n_rows, n_splits, BLOCK_R: tl.constexpr):
    """Combine the class chunks' statistics of BLOCK_R rows, in chunk order (deterministic)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    plane = n_splits * n_rows
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)  # M: the max over all chunks
    for split in range(0, n_splits):
        top = tl.maximum(top, tl.load(stats_ptr + split * n_rows + rows, mask=row_ok, other=0.0))
    total = tl.zeros([BLOCK_R], tl.float32)
    target = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], _NO_CLASS, tl.int32)
    for split in range(0, n_splits):
        out = split * n_rows + rows
        chunk_max = tl.load(stats_ptr + out, mask=row_ok, other=0.0)
        total += tl.load(stats_ptr + plane + out, mask=row_ok, other=1.0) * tl.exp(chunk_max - top)
        target += tl.load(stats_ptr + 2 * plane + out, mask=row_ok, other=0.0)
        chunk_best = tl.load(best_ptr + out, mask=row_ok, other=0)
        best = tl.where(chunk_max == top, tl.minimum(best, chunk_best), best)
    lse = top + tl.log(total)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - target, mask=row_ok)
    tl.store(correct_ptr + rows, (best == labels).to(tl.int8), mask=row_ok)


@triton.jit
def _grad_z_partial_kernel(z_ptr, w_ptr, z_norm_ptr, w_norm_ptr, labels_ptr, lse_ptr,
                           partial_ptr, radial_ptr, n_rows, n_classes, dim, stride_z,
                           stride_w, chunk, inv_tau, eps,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (i, s): recompute the logit tiles of BLOCK_N rows against class chunk s and sum,
    with dlogits = softmax - onehot and without the upstream scale,
    partial[s, rows] = sum_c dlogits[:, c] * w_hat[c] ([S, N, BLOCK_D] fp32) and
    radial[s, rows] = sum_c dlogits[:, c] * logits[:, c] ([S, N] fp32: tau * <partial, z_hat>,
    the radial part of the normalisation's gradient, from the logits as the forward saw them).
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    dot_dtype = z_ptr.dtype.element_ty
    z_tile = _dot_operand(_load_rows(z_ptr, rows, row_ok, feats, dim, stride_z), dot_dtype,
                          UPCAST)  # [BN, BD]
    z_norm = tl.load(z_norm_ptr + rows, mask=row_ok, other=1.0)
    row_scale = inv_tau / tl.maximum(z_norm, eps)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    radial = tl.zeros([BLOCK_N], tl.float32)
    c_end = tl.minimum(split * chunk + chunk, n_classes)
    for c0 in range(split * chunk, c_end, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        class_ok = classes < c_end
        w_tile = _dot_operand(_load_rows(w_ptr, classes, class_ok, feats, dim, stride_w),
                              dot_dtype, UPCAST)  # [BC, BD]
        w_norm = tl.load(w_norm_ptr + classes, mask=class_ok, other=1.0)
        w_inv_norm = 1.0 / tl.maximum(w_norm, eps)
        logits = _cosine_logits(z_tile, w_tile, row_scale, w_inv_norm, DOT_PRECISION)
        prob = tl.where(class_ok[None, :], tl.exp(logits - lse[:, None]), 0.0)  # [BN, BC]
        dlogits = prob - tl.where(classes[None, :] == labels[:, None], 1.0, 0.0)
        radial += tl.sum(dlogits * logits, axis=1)
        # w_hat = w * w_inv_norm, folded into the [BN, BC] operand rather than the [BC, BD]
        # tile. Zero rows (absent classes) get factor 0, not 1 / eps, so that an fp16 operand
        # cannot overflow (their w is 0).
        w_factor = tl.where(w_norm > 0.0, w_inv_norm, 0.0)
        dlogits = _dot_operand(dlogits * w_factor[None, :], dot_dtype, UPCAST)
        acc = tl.dot(dlogits, w_tile, acc, input_precision=DOT_PRECISION)

    out = split * n_rows + rows
    offsets = out.to(tl.int64)[:, None] * BLOCK_D + feats[None, :]
    tl.store(partial_ptr + offsets, acc, mask=row_ok[:, None])
    tl.store(radial_ptr + out, radial, mask=row_ok)


@triton.jit
def _grad_w_partial_kernel(z_ptr, w_ptr, z_norm_ptr, w_norm_ptr, labels_ptr, lse_ptr,
                           partial_ptr, radial_ptr, n_rows, n_classes, dim, stride_z,
                           stride_w, inv_tau, eps,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (c, s): BLOCK_C classes over the row blocks s, s + S, s + 2S, ... (S = grid axis
    1), so the reduction over N needs no atomics. Without the upstream scale:
    partial[s, classes] = sum_i dlogits[i, c] * z_hat[i] ([S, C, BLOCK_D] fp32) and
    radial[s, classes] = sum_i dlogits[i, c] * logits[i, c] ([S, C] fp32)."""
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    classes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    class_ok = classes < n_classes
    feats = tl.arange(0, BLOCK_D)
    dot_dtype = w_ptr.dtype.element_ty
    w_tile = _dot_operand(_load_rows(w_ptr, classes, class_ok, feats, dim, stride_w), dot_dtype,
                          UPCAST)  # [BC, BD]
    w_inv_norm = 1.0 / tl.maximum(tl.load(w_norm_ptr + classes, mask=class_ok, other=1.0), eps)

    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    radial = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(split * BLOCK_N, n_rows, n_splits * BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        z_tile = _dot_operand(_load_rows(z_ptr, rows, row_ok, feats, dim, stride_z), dot_dtype,
                              UPCAST)  # [BN, BD]
        z_norm = tl.load(z_norm_ptr + rows, mask=row_ok, other=1.0)
        z_inv_norm = 1.0 / tl.maximum(z_norm, eps)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        # Transposed tile [BC, BN] so that the accumulation is a plain [BC, BN] @ [BN, BD] dot.
        logits_t = _cosine_logits(w_tile, z_tile, w_inv_norm, z_inv_norm * inv_tau, DOT_PRECISION)
        valid = class_ok[:, None] & row_ok[None, :]
        prob_t = tl.where(valid, tl.exp(logits_t - lse[None, :]), 0.0)
        is_target = valid & (classes[:, None] == labels[None, :])
        dlogits_t = prob_t - tl.where(is_target, 1.0, 0.0)
        radial += tl.sum(dlogits_t * logits_t, axis=1)
        z_factor = tl.where(z_norm > 0.0, z_inv_norm, 0.0)  # z_hat = z * z_factor, as in dL/dz
        dlogits_t = _dot_operand(dlogits_t * z_factor[None, :], dot_dtype, UPCAST)
        acc = tl.dot(dlogits_t, z_tile, acc, input_precision=DOT_PRECISION)

    out = split * n_classes + classes
    offsets = out.to(tl.int64)[:, None] * BLOCK_D + feats[None, :]
    tl.store(partial_ptr + offsets, acc, mask=class_ok[:, None])
    tl.store(radial_ptr + out, radial, mask=class_ok)


@triton.jit
def _grad_finish_kernel(x_ptr, x_norm_ptr, partial_ptr, radial_ptr, grad_loss_ptr, grad_ptr,
                        n_rows, dim, stride_x, stride_g, n_splits, inv_tau, inv_n, eps,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/dx for BLOCK_R rows of x (z or W, unrounded): sum the split partials in a fixed order,
    scale by the upstream gradient / N, and chain through x / max(||x||, eps)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    radial = tl.zeros([BLOCK_R], tl.float32)
    for split in range(0, n_splits):
        out = split * n_rows + rows
        offsets = out.to(tl.int64)[:, None] * BLOCK_D + feats[None, :]
        acc += tl.load(partial_ptr + offsets, mask=row_ok[:, None], other=0.0)
        radial += tl.load(radial_ptr + out, mask=row_ok, other=0.0)
    grad_mean = tl.load(grad_loss_ptr) * inv_n  # upstream gradient / N (the loss is a mean)
    grad_hat = acc * (grad_mean * inv_tau)  # dL/dx_hat [BR, BD]
    x_raw = _load_rows(x_ptr, rows, row_ok, feats, dim, stride_x)
    x_norm = tl.load(x_norm_ptr + rows, mask=row_ok, other=1.0)
    grad = _normalize_backward(grad_hat, radial * grad_mean, x_raw, x_norm, eps)
    offsets = rows.to(tl.int64)[:, None] * stride_g + feats[None, :]
    mask = row_ok[:, None] & (feats < dim)[None, :]
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
# triton.jit returns an interpreter stand-in when TRITON_INTERPRET=1 was set before this import.
_INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes, pipelining and work split (block sizes: powers of two, >= 16, tl.dot's
    smallest tile).

    block_n: rows of z per tile; block_c: classes per tile; num_warps / num_stages: warps and
    software-pipeline stages per program of the forward; grad_num_warps / grad_num_stages: of
    the two gradient kernels (their [64, 256] fp32 accumulators want 8 warps); class_splits:
    class chunks of the forward and of dL/dz (grid axis 1); weight_grad_splits: row-block
    groups of dL/dW. A split count of None means: sized to fill whole waves of the GPU (1 on
    CPU), a wave being programs_per_sm (forward) or grad_programs_per_sm (dL/dW) resident
    programs on every SM (issue 22, item 8). Defaults come from `default_block_config`.
    """

    block_n: int = 64
    block_c: int = 64
    num_warps: int = 4
    grad_num_warps: int = 8
    class_splits: int | None = None
    weight_grad_splits: int | None = None
    num_stages: int = 2
    grad_num_stages: int = 3
    programs_per_sm: int = 1
    grad_programs_per_sm: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_c"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name}={size} must be a power of two >= 16")
        for name in ("num_stages", "grad_num_stages", "programs_per_sm", "grad_programs_per_sm"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _block_config(dot_dtype: torch.dtype, dim: int, device_type: str) -> BlockConfig:
    """Default tiles for this operand dtype and feature dim on this device type.

    CPU (TRITON_INTERPRET=1): every tile op is one numpy call, so large tiles mean fewer
    interpreted iterations. CUDA (tools/aot_check.py, docs/KERNELS.md: no spills on sm_90a or
    sm_80 at D = 256 under triton 3.6 and 3.8):
    - 16-bit operands: BLOCK_N = BLOCK_C = 64, one warpgroup per 64-row (or 64-class) tile
      side, which wgmma needs on sm_90a (M >= 64). The forward takes 4 warps and 2 stages:
      ~96 KB of shared memory, so 2 programs per SM on an H100 or A100 (3 stages took 128 KB:
      one). The gradient kernels take 8 warps and 3 stages: their ~200-250 registers per
      thread allow one program per SM whatever the stages.
    - fp32 operands (exact fp32 dots on CUDA cores): 16 x 16 tiles, 4 warps, 2 stages in
      every kernel. Larger tiles spill under triton 3.6 (32 x 32 with 8 warps: 7-9 KB in
      the gradient kernels on sm_90a, issue 22 item 7); these keep 4 programs per SM.
    block_c halves per doubling of D past 256. programs_per_sm values are those of both
    sm_90a and sm_80 (tests/test_aot_check.py checks them against the compiled kernels).
    Not yet timed on a GPU: tools/bench_kernel.py takes --block_n/--block_c/--num_warps.
    """
    if device_type != "cuda":
        return BlockConfig(block_n=256, block_c=256, num_warps=4, grad_num_warps=4)
    block_d = _block_d(dim)
    if dot_dtype == torch.float32:
        return BlockConfig(block_n=16, block_c=16, num_warps=4, grad_num_warps=4,
                           num_stages=2, grad_num_stages=2, programs_per_sm=4,
                           grad_programs_per_sm=4)
    return BlockConfig(block_n=64, block_c=max(16, 64 * 256 // max(block_d, 256)),
                       num_warps=4, grad_num_warps=8, num_stages=2, grad_num_stages=3,
                       programs_per_sm=2, grad_programs_per_sm=1)


def default_block_config(z: torch.Tensor, weight: torch.Tensor) -> BlockConfig:
    """Tiles for these operands, in the current autocast state (see `_block_config`)."""
    return _block_config(dot_operand_dtype(z, weight), z.shape[1], z.device.type)


def dot_dtype_for(z: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Operand dtype of the kernels' dots: trex_fast.losses.dot_operand_dtype, the promoted
    input dtype, or the autocast dtype where that is fp32 under autocast (so bf16 projector
    outputs against fp32 prototypes inside the training step run on tensor cores)."""
    return dot_operand_dtype(z, weight)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _elementwise_rows(block_d: int) -> int:
    """Rows per program of the row-wise kernels (no tl.dot): about 4k elements per program."""
    return max(1, 4096 // block_d)


# A split grid adds fp32 partial sums (splits x rows x BLOCK_D) and merge work: splits are
# taken only while the grid has at most this many waves, enough to fill a GPU's SMs.
_MAX_SPLIT_WAVES = 4


def _wave_cost(programs_per_split: int, splits: int, work: int, slots: int) -> int:
    """Time of a grid in units of one block's work: whole waves of `slots` resident
    programs, each wave as long as its longest program (its share of `work` blocks split
    `splits` ways, plus one block for the program's fixed loads and stores)."""
    return triton.cdiv(programs_per_split * splits, slots) * (triton.cdiv(work, splits) + 1)


def _wave_splits(requested: int | None, other_axis: int, most: int,
                 slots: int | None) -> int:
    """Programs along a grid's split axis: `requested` if given (at most `most`, the blocks
    there are to split), 1 on CPU (slots None); else, among the split counts whose grid of
    other_axis x splits programs has at most _MAX_SPLIT_WAVES waves of `slots`, the one of
    least `_wave_cost`, the fewest programs among equals. Only the counts ceil(most / k) are
    distinct splits of `most` blocks into chunks of k."""
    if requested is not None:
        return max(1, min(requested, most))
    if slots is None:
        return 1
    candidates = {triton.cdiv(most, chunk) for chunk in range(1, most + 1)}
    candidates = [s for s in candidates if s == 1 or other_axis * s <= _MAX_SPLIT_WAVES * slots]
    return min(candidates, key=lambda s: (_wave_cost(other_axis, s, most, slots), s))


@dataclass(frozen=True)
class LaunchPlan:
    """Grids of one call, a pure function of the shape (`plan_launch`), so that aot_kernels
    describes exactly what the launchers run."""

    blocks: BlockConfig
    block_d: int
    row_blocks: int  # ceil(N / block_n)
    class_blocks: int  # ceil(C / block_c)
    class_chunk: int  # classes per chunk of the forward: a multiple of block_c
    class_splits: int  # ceil(C / class_chunk): no empty chunk
    weight_grad_splits: int
    grad_class_chunk: int  # the same for dL/dz, whose programs are fewer per SM
    grad_class_splits: int


def _class_chunking(requested: int | None, row_blocks: int, n_classes: int, block_c: int,
                    slots: int | None) -> tuple[int, int]:
    """(classes per chunk, chunks) of a grid of row_blocks x chunks programs."""
    class_blocks = triton.cdiv(n_classes, block_c)
    splits = _wave_splits(requested, row_blocks, class_blocks, slots)
    chunk = triton.cdiv(class_blocks, splits) * block_c
    return chunk, triton.cdiv(n_classes, chunk)


@functools.lru_cache(maxsize=64)  # called once per step at a handful of shapes
def plan_launch(n: int, n_classes: int, dim: int, blocks: BlockConfig,
                sms: int | None) -> LaunchPlan:
    """sms: streaming multiprocessors of the GPU (None on CPU). The forward's class splits
    fill waves of sms x blocks.programs_per_sm programs, those of dL/dz and dL/dW waves of
    sms x blocks.grad_programs_per_sm; blocks.class_splits, if set, is taken by both."""
    row_blocks = triton.cdiv(n, blocks.block_n)
    class_blocks = triton.cdiv(n_classes, blocks.block_c)
    slots = None if sms is None else sms * blocks.programs_per_sm
    grad_slots = None if sms is None else sms * blocks.grad_programs_per_sm
    chunk, splits = _class_chunking(blocks.class_splits, row_blocks, n_classes, blocks.block_c,
                                    slots)
    grad_chunk, grad_splits = _class_chunking(blocks.class_splits, row_blocks, n_classes,
                                              blocks.block_c, grad_slots)
    return LaunchPlan(
        blocks=blocks, block_d=_block_d(dim), row_blocks=row_blocks, class_blocks=class_blocks,
        class_chunk=chunk, class_splits=splits,
        weight_grad_splits=_wave_splits(blocks.weight_grad_splits, class_blocks, row_blocks,
                                        grad_slots),
        grad_class_chunk=grad_chunk, grad_class_splits=grad_splits)


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
@dataclass
class _Operands:
    """Everything the kernels read; the last three tensors are produced by the forward."""

    z: torch.Tensor  # [N, D] as given (unit column stride): norms and dL/dz's chain rule
    weight: torch.Tensor  # [C, D] as given
    z_op: torch.Tensor  # z rounded to the dot operand dtype (z itself if it is that dtype)
    w_op: torch.Tensor  # weight rounded likewise
    labels: torch.Tensor  # [N] int64
    inv_tau: float
    plan: LaunchPlan
    z_norm: torch.Tensor | None = None  # [N] fp32, ||z_i||
    w_norm: torch.Tensor | None = None  # [C] fp32, ||w_c||
    lse: torch.Tensor | None = None  # [N] fp32, log-sum-exp of row i's logits

    def meta(self, num_warps: int, num_stages: int) -> dict:
        """Compile-time arguments of the tiled kernels."""
        return dict(
            BLOCK_N=self.plan.blocks.block_n, BLOCK_C=self.plan.blocks.block_c,
            BLOCK_D=self.plan.block_d,
            # fp32 operands: exact fp32 products (no TF32), so fp32 matches the reference.
            DOT_PRECISION="ieee", UPCAST=_INTERPRETED and self.z_op.dtype != torch.float32,
            num_warps=num_warps, num_stages=num_stages,
        )


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """||x[r]|| for every row of x [R, D], fp32 [R]."""
    norms = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    block_d = _block_d(x.shape[1])
    block_r = _elementwise_rows(block_d)
    grid = (triton.cdiv(x.shape[0], block_r),)
    _row_norm_kernel[grid](x, norms, x.shape[0], x.shape[1], x.stride(0),
                           BLOCK_R=block_r, BLOCK_D=block_d)
    return norms


def _forward(ops: _Operands) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ops.z_norm, ops.w_norm, ops.lse; return (mean loss [] fp32, correct [N] bool)."""
    n, dim = ops.z.shape
    n_classes = ops.weight.shape[0]
    plan, device = ops.plan, ops.z.device
    ops.z_norm, ops.w_norm = _row_norms(ops.z), _row_norms(ops.weight)
    stats = torch.empty((3, plan.class_splits, n), device=device, dtype=torch.float32)
    best = torch.empty((plan.class_splits, n), device=device, dtype=torch.int32)
    _forward_kernel[(plan.row_blocks, plan.class_splits)](
        ops.z_op, ops.w_op, ops.z_norm, ops.w_norm, ops.labels, stats, best,
        n, n_classes, dim, ops.z_op.stride(0), ops.w_op.stride(0), plan.class_chunk,
        ops.inv_tau, NORM_EPS, **ops.meta(plan.blocks.num_warps, plan.blocks.num_stages),
    )
    ops.lse = torch.empty(n, device=device, dtype=torch.float32)
    loss_rows = torch.empty(n, device=device, dtype=torch.float32)
    correct = torch.empty(n, device=device, dtype=torch.int8)
    block_r = 1024
    _merge_kernel[(triton.cdiv(n, block_r),)](
        stats, best, ops.labels, ops.lse, loss_rows, correct, n, plan.class_splits,
        BLOCK_R=block_r,
    )
    # Mean by a torch reduction: deterministic, unlike a float atomic_add across programs.
    return loss_rows.mean(), correct.view(torch.bool)


def _finish_grad(x: torch.Tensor, x_norm: torch.Tensor, partial: torch.Tensor,
                 radial: torch.Tensor, grad_loss: torch.Tensor, inv_tau: float,
                 n: int) -> torch.Tensor:
    """dL/dx [R, D] in x's dtype from partial [S, R, BLOCK_D] and radial [S, R] sums."""
    grad = torch.empty_like(x)
    rows, dim = x.shape
    block_d = partial.shape[2]
    block_r = _elementwise_rows(block_d)
    _grad_finish_kernel[(triton.cdiv(rows, block_r),)](
        x, x_norm, partial, radial, grad_loss, grad, rows, dim, x.stride(0), grad.stride(0),
        partial.shape[0], inv_tau, 1.0 / n, NORM_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return grad


def _grad_z(ops: _Operands, grad_loss: torch.Tensor) -> torch.Tensor:
    """dL/dz [N, D] in z's dtype; grad_loss: [1] fp32 upstream gradient of the mean loss."""
    n, dim = ops.z.shape
    plan = ops.plan
    partial = torch.empty((plan.grad_class_splits, n, plan.block_d), device=ops.z.device,
                          dtype=torch.float32)
    radial = torch.empty((plan.grad_class_splits, n), device=ops.z.device, dtype=torch.float32)
    _grad_z_partial_kernel[(plan.row_blocks, plan.grad_class_splits)](
        ops.z_op, ops.w_op, ops.z_norm, ops.w_norm, ops.labels, ops.lse, partial, radial,
        n, ops.weight.shape[0], dim, ops.z_op.stride(0), ops.w_op.stride(0),
        plan.grad_class_chunk, ops.inv_tau, NORM_EPS,
        **ops.meta(plan.blocks.grad_num_warps, plan.blocks.grad_num_stages),
    )
    return _finish_grad(ops.z, ops.z_norm, partial, radial, grad_loss, ops.inv_tau, n)


def _grad_weight(ops: _Operands, grad_loss: torch.Tensor) -> torch.Tensor:
    """dL/dW [C, D] in W's dtype, through [splits, C, BLOCK_D] fp32 partial sums."""
    n, dim = ops.z.shape
    n_classes = ops.weight.shape[0]
    plan = ops.plan
    splits = plan.weight_grad_splits
    partial = torch.empty((splits, n_classes, plan.block_d), device=ops.z.device,
                          dtype=torch.float32)
    radial = torch.empty((splits, n_classes), device=ops.z.device, dtype=torch.float32)
    _grad_w_partial_kernel[(plan.class_blocks, splits)](
        ops.z_op, ops.w_op, ops.z_norm, ops.w_norm, ops.labels, ops.lse, partial, radial,
        n, n_classes, dim, ops.z_op.stride(0), ops.w_op.stride(0), ops.inv_tau, NORM_EPS,
        **ops.meta(plan.blocks.grad_num_warps, plan.blocks.grad_num_stages),
    )
    return _finish_grad(ops.weight, ops.w_norm, partial, radial, grad_loss, ops.inv_tau, n)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
class FusedPrototypeCE(torch.autograd.Function):
    """(mean CE, top-1 correct) of cosine logits; gradients for z and, if it needs one, W."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float,
                blocks: BlockConfig, dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # The operands' rounding, once per call for every program (issue 14, item 9).
        z_op, w_op = z.to(dot_dtype), weight.to(dot_dtype)
        plan = plan_launch(z.shape[0], weight.shape[0], z.shape[1], blocks,
                           _sm_count(z.device))
        ops = _Operands(z=z, weight=weight, z_op=z_op, w_op=w_op, labels=labels,
                        inv_tau=1.0 / tau, plan=plan)
        loss, correct = _forward(ops)
        ctx.save_for_backward(z, weight, z_op, w_op, labels, ops.z_norm, ops.w_norm, ops.lse)
        ctx.inv_tau, ctx.plan = ops.inv_tau, plan
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, grad_loss: torch.Tensor | None, grad_correct: torch.Tensor | None):
        z, weight, z_op, w_op, labels, z_norm, w_norm, lse = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None
        ops = _Operands(z=z, weight=weight, z_op=z_op, w_op=w_op, labels=labels,
                        inv_tau=ctx.inv_tau, plan=ctx.plan, z_norm=z_norm, w_norm=w_norm,
                        lse=lse)
        # A one-element fp32 device tensor: the kernels read it, so no host sync.
        grad_loss = grad_loss.reshape(1).to(torch.float32).contiguous()
        grad_z = _grad_z(ops, grad_loss) if ctx.needs_input_grad[0] else None
        grad_w = _grad_weight(ops, grad_loss) if ctx.needs_input_grad[1] else None
        return grad_z, grad_w, None, None, None, None


def _check_inputs(z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  tau: float) -> None:
    """Shape, dtype and device checks on metadata only (no host sync)."""
    if z.ndim != 2 or weight.ndim != 2 or z.shape[1] != weight.shape[1]:
        raise ValueError(f"need z [N, D] and weight [C, D]; got {tuple(z.shape)}, "
                         f"{tuple(weight.shape)}")
    if labels.shape != (z.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{z.shape[0]}]; got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    for name, t in (("z", z), ("weight", weight)):
        if t.dtype not in _TL_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not one of {list(_TL_DTYPES)}")
    if not (z.device == weight.device == labels.device):
        raise ValueError(f"z, weight, labels on {z.device}, {weight.device}, {labels.device}")
    if not tau > 0:
        raise ValueError(f"tau={tau} must be > 0")
    if z.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError("Triton kernels on CPU need TRITON_INTERPRET=1 in the environment "
                           "before trex_fast.kernels.prototype_ce is imported")


def fused_prototype_ce(z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float,
                       *, blocks: BlockConfig | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the cosine logits z W^T / (||z|| ||w|| tau) and top-1 correctness.

    z: [N, D] (bf16, fp16 or fp32); weight: [C, D] (same choice; the dots' operand dtype is
    `dot_dtype_for(z, weight)`: the promoted dtype, or the autocast dtype under autocast);
    labels: [N] int64 in [0, C); tau > 0. Returns (loss [] fp32, correct [N] bool), matching
    trex_fast.losses.torch_prototype_ce_with_top1 without an N x C tensor. Unlike
    F.cross_entropy there is no ignore_index and labels are not range-checked (that would
    need a host sync): a label outside [0, C) contributes lse as its loss. blocks: tile sizes
    and splits (default: `default_block_config`).
    fp16 limitation: a non-zero row of z or W with norm below 1/65504 overflows an fp16 dot
    operand in the backward (non-finite gradients); zero rows are exact.
    """
    _check_inputs(z, weight, labels, tau)
    dot_dtype = dot_dtype_for(z, weight)
    blocks = blocks or _block_config(dot_dtype, z.shape[1], z.device.type)
    # Kernels assume unit column stride; .contiguous() copies only if needed (inputs untouched).
    z = z if z.stride(1) == 1 else z.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    return FusedPrototypeCE.apply(z, weight, labels.contiguous(), float(tau), blocks, dot_dtype)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (tools/aot_check.py)
# ---------------------------------------------------------------------------------------------
H100_SMS = 132  # H100 / H200 SXM: the split counts aot_kernels reports
_FLOAT_ARGS = ("inv_tau", "inv_n", "eps")


def _aot_kernel(name: str, fn, pointers: dict, ints: dict, constexprs: dict,
                production: bool, **options):
    from pipelines.stage.aot import for_launch

    return for_launch(name, fn, pointers, ints, constexprs, floats=_FLOAT_ARGS,
                      production=production, **options)


def _aot_variant(n: int, c: int, tag: str, z_dtype: torch.dtype, w_dtype: torch.dtype,
                 dot_dtype: torch.dtype, production: bool) -> list:
    """Every kernel that one forward + backward launches for these shapes and dtypes."""
    f32, dim = torch.float32, PRODUCTION_DIM
    blocks = _block_config(dot_dtype, dim, "cuda")
    plan = plan_launch(n, c, dim, blocks, H100_SMS)
    tiled = dict(BLOCK_N=blocks.block_n, BLOCK_C=blocks.block_c, BLOCK_D=plan.block_d,
                 DOT_PRECISION="ieee", UPCAST=False)
    pointers = dict(z_ptr=dot_dtype, w_ptr=dot_dtype, z_norm_ptr=f32, w_norm_ptr=f32,
                    labels_ptr=torch.int64, stats_ptr=f32, best_ptr=torch.int32, lse_ptr=f32,
                    loss_ptr=f32, correct_ptr=torch.int8, partial_ptr=f32, radial_ptr=f32,
                    grad_loss_ptr=f32, norm_ptr=f32)
    ints = dict(n_rows=n, n_classes=c, dim=dim, stride_z=dim, stride_w=dim, stride_x=dim,
                stride_g=dim, chunk=plan.class_chunk)
    block_r = _elementwise_rows(plan.block_d)
    rowwise = dict(BLOCK_R=block_r, BLOCK_D=plan.block_d)
    kernels = []
    for what, x_dtype, rows in (("z", z_dtype, n), ("w", w_dtype, c)):
        kernels.append(_aot_kernel(
            f"prototype_ce_row_norm_{what}[{tag}]", _row_norm_kernel,
            dict(x_ptr=x_dtype, norm_ptr=f32), dict(ints, n_rows=rows), rowwise, production))
    kernels.append(_aot_kernel(
        f"prototype_ce_fwd[{tag}]", _forward_kernel, pointers, ints, tiled,
        production, num_warps=blocks.num_warps, num_stages=blocks.num_stages, has_dot=True))
    kernels.append(_aot_kernel(
        f"prototype_ce_merge[{tag}]", _merge_kernel, pointers,
        dict(n_rows=n, n_splits=plan.class_splits), dict(BLOCK_R=1024), production))
    kernels.append(_aot_kernel(
        f"prototype_ce_grad_z[{tag}]", _grad_z_partial_kernel, pointers,
        dict(ints, chunk=plan.grad_class_chunk), tiled,
        production, num_warps=blocks.grad_num_warps, num_stages=blocks.grad_num_stages,
        has_dot=True))
    kernels.append(_aot_kernel(
        f"prototype_ce_grad_w[{tag}]", _grad_w_partial_kernel, pointers, ints, tiled,
        production, num_warps=blocks.grad_num_warps, num_stages=blocks.grad_num_stages,
        has_dot=True))
    for what, x_dtype, rows, splits in (("z", z_dtype, n, plan.grad_class_splits),
                                        ("w", w_dtype, c, plan.weight_grad_splits)):
        kernels.append(_aot_kernel(
            f"prototype_ce_grad_finish_{what}[{tag}]", _grad_finish_kernel,
            dict(pointers, x_ptr=x_dtype, x_norm_ptr=f32, grad_ptr=x_dtype),
            dict(ints, n_rows=rows, n_splits=splits), rowwise, production))
    return kernels


def aot_kernels() -> list:
    """The launch configurations the launchers pick at the production shapes (N, C) in
    PRODUCTION_SHAPES, D = PRODUCTION_DIM (kernels/shapes.py), on an H100/H200: production is
    the training step's bf16 projector outputs against fp32 prototypes under bf16 autocast
    (bf16 dots); precision=fp32 (exact fp32 dots, no tensor cores) is listed as not
    production. The weight-gradient kernels are those of the plain preset's learned
    classifier."""
    kernels = []
    for n, c in PRODUCTION_SHAPES:
        kernels += _aot_variant(n, c, shape_label(n, c), torch.bfloat16, torch.float32,
                                torch.bfloat16, production=True)
        kernels += _aot_variant(n, c, f"fp32,{shape_label(n, c)}", torch.float32,
                                torch.float32, torch.float32, production=False)
    return kernels
