"""Fused prototype cross-entropy (issue 6): cosine logits, online log-sum-exp and top-1 in Triton.

Computes, for projector outputs z [N, D], class prototypes or cosine-classifier weights W [C, D],
labels y [N] and temperature tau, the same two values as the plain-torch specification
`trex_fast.losses.torch_prototype_ce_with_top1`:

    logits = normalize(z) @ normalize(W).T / tau              # [N, C], never stored
    loss = mean_i (logsumexp_c logits[i] - logits[i, y_i])    # fp32 scalar
    correct = argmax_c logits[i] == y_i                        # bool [N]

The N x C logits live only as [BLOCK_N, BLOCK_C] tiles on chip. The forward keeps, per row, a
running max and sum of exponentials over the class tiles (flash-attention style), the target
logit and the running argmax, and saves only the row norms of z and W and the per-row
log-sum-exp: extra memory O(N + C), plus O(C * D) for the weight gradient's partial sums.
The backward recomputes the logit tiles. Logits are formed as <z, w> * (1 / ||z||) * (1 / ||w||)
/ tau with fp32 accumulation of the raw operands, so bf16/fp16 inputs are not rounded again after
normalisation (fp32 inputs are rounded on chip to the autocast dtype under autocast, see
`dot_dtype_for`); a zero row of W (a class absent from the memory bank) gives a logit of exactly
0 (F.normalize semantics: x / max(||x||, 1e-12)).

Kernels never write their inputs and never synchronise with the host: the upstream gradient is
read from device memory inside the backward kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

NORM_EPS = 1e-12  # F.normalize's default eps: x / max(||x||, eps)
_NO_CLASS = tl.constexpr(2**31 - 1)  # above any class index: neutral for the argmax's min
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ---------------------------------------------------------------------------------------------
# Shared device helpers
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
def _cosine_logits(z_tile, w_tile, row_scale, w_inv_norm, DOT_PRECISION: tl.constexpr):
    """Logit tile [BN, BC] = <z, w> * row_scale * w_inv_norm, accumulated in fp32.

    row_scale [BN] is 1 / (max(||z||, eps) * tau); w_inv_norm [BC] is 1 / max(||w||, eps).
    """
    raw = tl.dot(z_tile, tl.trans(w_tile), input_precision=DOT_PRECISION)  # [BN, BC] fp32
    return raw * row_scale[:, None] * w_inv_norm[None, :]


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
def _forward_kernel(z_ptr, w_ptr, w_norm_ptr, labels_ptr,
                    z_norm_ptr, lse_ptr, loss_ptr, correct_ptr,
                    n_rows, n_classes, dim, stride_z, stride_w, inv_tau, eps,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """One program per BLOCK_N rows of z: online log-sum-exp, target logit and argmax over C."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    z_raw = _load_rows(z_ptr, rows, row_ok, feats, dim, stride_z)  # [BN, BD]
    z_f32 = z_raw.to(tl.float32)
    z_norm = tl.sqrt(tl.sum(z_f32 * z_f32, axis=1))  # [BN]
    row_scale = inv_tau / tl.maximum(z_norm, eps)
    z_tile = _dot_operand(z_raw, DOT_DTYPE, UPCAST)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)  # [BN] int64

    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max == best logit so far
    run_sum = tl.zeros([BLOCK_N], tl.float32)  # sum of exp(logit - run_max)
    target = tl.zeros([BLOCK_N], tl.float32)  # logit of the label's class
    best = tl.zeros([BLOCK_N], tl.int32)  # first index of the running max
    for c0 in range(0, n_classes, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        class_ok = classes < n_classes
        w_raw = _load_rows(w_ptr, classes, class_ok, feats, dim, stride_w)  # [BC, BD]
        w_tile = _dot_operand(w_raw, DOT_DTYPE, UPCAST)
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

    lse = run_max + tl.log(run_sum)
    tl.store(z_norm_ptr + rows, z_norm, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - target, mask=row_ok)
    tl.store(correct_ptr + rows, (best == labels).to(tl.int8), mask=row_ok)


@triton.jit
def _grad_z_kernel(z_ptr, w_ptr, z_norm_ptr, w_norm_ptr, labels_ptr, lse_ptr, grad_loss_ptr,
                   grad_z_ptr, n_rows, n_classes, dim, stride_z, stride_w, stride_gz,
                   inv_tau, inv_n, eps,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """dL/dz for BLOCK_N rows: recompute logit tiles, dlogits = softmax - onehot, sum over C."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_D)
    z_raw = _load_rows(z_ptr, rows, row_ok, feats, dim, stride_z)  # [BN, BD]
    z_tile = _dot_operand(z_raw, DOT_DTYPE, UPCAST)
    z_norm = tl.load(z_norm_ptr + rows, mask=row_ok, other=1.0)
    row_scale = inv_tau / tl.maximum(z_norm, eps)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # sum_c dlogits[:, c] * w_hat[c]
    # sum_c dlogits[:, c] * logits[:, c] = tau * <acc, z_hat>: the radial part of the gradient,
    # gathered here at [BN, BC] cost so that the epilogue needs no [BN, BD] reduction.
    radial_acc = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, n_classes, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        class_ok = classes < n_classes
        w_raw = _load_rows(w_ptr, classes, class_ok, feats, dim, stride_w)  # [BC, BD]
        w_norm = tl.load(w_norm_ptr + classes, mask=class_ok, other=1.0)
        w_inv_norm = 1.0 / tl.maximum(w_norm, eps)
        w_tile = _dot_operand(w_raw, DOT_DTYPE, UPCAST)
        logits = _cosine_logits(z_tile, w_tile, row_scale, w_inv_norm, DOT_PRECISION)
        prob = tl.where(class_ok[None, :], tl.exp(logits - lse[:, None]), 0.0)  # [BN, BC]
        dlogits = prob - tl.where(classes[None, :] == labels[:, None], 1.0, 0.0)
        radial_acc += tl.sum(dlogits * logits, axis=1)
        # w_hat = w * w_inv_norm, folded into the [BN, BC] operand: rescaling the [BC, BD] tile
        # instead made ptxas spill (64 x 64 tiles, D = 256, sm_90). Zero rows (absent classes)
        # get factor 0, not 1 / eps, so that an fp16 operand cannot overflow (their w is 0).
        w_factor = tl.where(w_norm > 0.0, w_inv_norm, 0.0)
        dlogits = _dot_operand(dlogits * w_factor[None, :], DOT_DTYPE, UPCAST)
        acc = tl.dot(dlogits, w_tile, acc, input_precision=DOT_PRECISION)

    grad_mean = tl.load(grad_loss_ptr) * inv_n  # upstream gradient / N (the loss is a mean)
    grad_hat = acc * (grad_mean * inv_tau)  # dL/dz_hat [BN, BD]
    # Reloaded (from L2) rather than kept live across the loop: frees registers for the tiles.
    z_raw = _load_rows(z_ptr, rows, row_ok, feats, dim, stride_z)
    grad = _normalize_backward(grad_hat, radial_acc * grad_mean, z_raw, z_norm, eps)
    offsets = rows.to(tl.int64)[:, None] * stride_gz + feats[None, :]
    mask = row_ok[:, None] & (feats < dim)[None, :]
    tl.store(grad_z_ptr + offsets, grad.to(grad_z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_w_partial_kernel(z_ptr, w_ptr, z_norm_ptr, w_norm_ptr, labels_ptr, lse_ptr,
                           partial_ptr, n_rows, n_classes, dim, stride_z, stride_w,
                           inv_tau, eps,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr):
    """Partial dL/dw_hat (without the upstream scale) of BLOCK_C classes over a strided subset of
    row blocks: program (c, s) handles row blocks s, s + S, s + 2S, ... (S = grid axis 1), so the
    reduction over N needs no atomics and is deterministic. partial: [S, C, BLOCK_D] fp32."""
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    classes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    class_ok = classes < n_classes
    feats = tl.arange(0, BLOCK_D)
    w_raw = _load_rows(w_ptr, classes, class_ok, feats, dim, stride_w)  # [BC, BD]
    w_tile = _dot_operand(w_raw, DOT_DTYPE, UPCAST)
    w_inv_norm = 1.0 / tl.maximum(tl.load(w_norm_ptr + classes, mask=class_ok, other=1.0), eps)

    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)  # sum_i dlogits[i, c] * z_hat[i]
    for n0 in range(split * BLOCK_N, n_rows, n_splits * BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        z_raw = _load_rows(z_ptr, rows, row_ok, feats, dim, stride_z)  # [BN, BD]
        z_norm = tl.load(z_norm_ptr + rows, mask=row_ok, other=1.0)
        z_inv_norm = 1.0 / tl.maximum(z_norm, eps)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        # Transposed tile [BC, BN] so that the accumulation is a plain [BC, BN] @ [BN, BD] dot.
        z_tile = _dot_operand(z_raw, DOT_DTYPE, UPCAST)
        logits_t = _cosine_logits(w_tile, z_tile, w_inv_norm, z_inv_norm * inv_tau, DOT_PRECISION)
        valid = class_ok[:, None] & row_ok[None, :]
        prob_t = tl.where(valid, tl.exp(logits_t - lse[None, :]), 0.0)
        is_target = valid & (classes[:, None] == labels[None, :])
        dlogits_t = prob_t - tl.where(is_target, 1.0, 0.0)
        z_factor = tl.where(z_norm > 0.0, z_inv_norm, 0.0)  # z_hat = z * z_factor, as in dL/dz
        dlogits_t = _dot_operand(dlogits_t * z_factor[None, :], DOT_DTYPE, UPCAST)
        acc = tl.dot(dlogits_t, z_tile, acc, input_precision=DOT_PRECISION)

    offsets = (split * n_classes + classes).to(tl.int64)[:, None] * BLOCK_D + feats[None, :]
    tl.store(partial_ptr + offsets, acc, mask=class_ok[:, None])


@triton.jit
def _grad_w_finish_kernel(w_ptr, w_norm_ptr, partial_ptr, grad_loss_ptr, grad_w_ptr,
                          n_classes, dim, stride_w, stride_gw, n_splits, inv_tau, inv_n, eps,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum the split partials in a fixed order, scale, and chain through W's normalisation."""
    classes = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    class_ok = classes < n_classes
    feats = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(0, n_splits):
        offsets = (split * n_classes + classes).to(tl.int64)[:, None] * BLOCK_D + feats[None, :]
        acc += tl.load(partial_ptr + offsets, mask=class_ok[:, None], other=0.0)
    grad_hat = acc * (tl.load(grad_loss_ptr) * inv_n * inv_tau)  # dL/dw_hat [BR, BD]
    w_raw = _load_rows(w_ptr, classes, class_ok, feats, dim, stride_w)
    w_norm = tl.load(w_norm_ptr + classes, mask=class_ok, other=1.0)
    radial = tl.sum(grad_hat * w_raw.to(tl.float32), axis=1) / tl.maximum(w_norm, eps)
    grad = _normalize_backward(grad_hat, radial, w_raw, w_norm, eps)
    offsets = classes.to(tl.int64)[:, None] * stride_gw + feats[None, :]
    mask = class_ok[:, None] & (feats < dim)[None, :]
    tl.store(grad_w_ptr + offsets, grad.to(grad_w_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# triton.jit returns an interpreter stand-in when TRITON_INTERPRET=1 was set before this import.
_INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes shared by the kernels (powers of two, >= 16: tl.dot's smallest tile).

    block_n: rows of z per tile; block_c: classes per tile; num_warps: warps per program;
    weight_grad_splits: row-block groups reduced in parallel for dL/dW (None: enough programs
    to fill the GPU, 1 on CPU). Defaults come from `default_block_config`.
    """

    block_n: int = 64
    block_c: int = 64
    num_warps: int = 4
    weight_grad_splits: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_c"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name}={size} must be a power of two >= 16")


def default_block_config(z: torch.Tensor, weight: torch.Tensor) -> BlockConfig:
    """Tiles for these operands.

    CPU (TRITON_INTERPRET=1): every tile op is one numpy call, so large tiles mean fewer
    interpreted iterations. CUDA: compiled ahead of time for sm_90 (triton 3.8, ptxas -v), the
    sizes below leave no register spills in the three tiled kernels at D = 128 and 256 for
    bf16/fp16 inputs and for bf16 z with fp32 W under autocast (fp32 at D = 256: 32 bytes in
    the dW kernel). fp32 inputs double the bytes per staged tile, hence block_c 32. block_n =
    32 also gives N / 32 programs, enough to fill an H100 at the production N = 2304. Not yet
    timed on a GPU: tools/bench_kernel.py takes --block_n/--block_c/--num_warps to tune them.
    """
    if z.device.type != "cuda":
        return BlockConfig(block_n=256, block_c=256, num_warps=4)
    block_d = _block_d(z.shape[1])
    widest = max(z.element_size(), weight.element_size())
    block_c = 32 if widest >= 4 else 64
    block_c = max(16, block_c * 256 // max(block_d, 256))  # halve per doubling of D past 256
    return BlockConfig(block_n=32, block_c=block_c, num_warps=8 if block_d >= 256 else 4)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _elementwise_rows(block_d: int) -> int:
    """Rows per program of the row-wise kernels (no tl.dot): about 4k elements per program."""
    return max(1, 4096 // block_d)


@dataclass
class _Operands:
    """Everything the kernels read; the last three tensors are produced by the forward."""

    z: torch.Tensor  # [N, D], unit column stride
    weight: torch.Tensor  # [C, D], unit column stride
    labels: torch.Tensor  # [N] int64
    inv_tau: float
    blocks: BlockConfig
    dot_dtype: torch.dtype  # operand dtype of every tl.dot (see `dot_dtype_for`)
    z_norm: torch.Tensor | None = None  # [N] fp32, ||z_i||
    w_norm: torch.Tensor | None = None  # [C] fp32, ||w_c||
    lse: torch.Tensor | None = None  # [N] fp32, log-sum-exp of row i's logits

    def meta(self) -> dict:
        """Compile-time arguments of the forward and gradient kernels."""
        return dict(
            BLOCK_N=self.blocks.block_n, BLOCK_C=self.blocks.block_c,
            BLOCK_D=_block_d(self.z.shape[1]), DOT_DTYPE=_TL_DTYPES[self.dot_dtype],
            # fp32 operands: exact fp32 products (no TF32), so fp32 matches the reference.
            DOT_PRECISION="ieee", UPCAST=_INTERPRETED and self.dot_dtype != torch.float32,
            num_warps=self.blocks.num_warps,
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
    device = ops.z.device
    ops.w_norm = _row_norms(ops.weight)
    ops.z_norm = torch.empty(n, device=device, dtype=torch.float32)
    ops.lse = torch.empty(n, device=device, dtype=torch.float32)
    loss_rows = torch.empty(n, device=device, dtype=torch.float32)
    correct = torch.empty(n, device=device, dtype=torch.int8)
    grid = (triton.cdiv(n, ops.blocks.block_n),)
    _forward_kernel[grid](
        ops.z, ops.weight, ops.w_norm, ops.labels, ops.z_norm, ops.lse, loss_rows, correct,
        n, n_classes, dim, ops.z.stride(0), ops.weight.stride(0), ops.inv_tau, NORM_EPS,
        **ops.meta(),
    )
    # Mean by a torch reduction: deterministic, unlike a float atomic_add across programs.
    return loss_rows.mean(), correct.view(torch.bool)


def _grad_z(ops: _Operands, grad_loss: torch.Tensor) -> torch.Tensor:
    """dL/dz [N, D] in z's dtype; grad_loss: [1] fp32 upstream gradient of the mean loss."""
    n, dim = ops.z.shape
    grad_z = torch.empty_like(ops.z)
    grid = (triton.cdiv(n, ops.blocks.block_n),)
    _grad_z_kernel[grid](
        ops.z, ops.weight, ops.z_norm, ops.w_norm, ops.labels, ops.lse, grad_loss, grad_z,
        n, ops.weight.shape[0], dim, ops.z.stride(0), ops.weight.stride(0), grad_z.stride(0),
        ops.inv_tau, 1.0 / n, NORM_EPS, **ops.meta(),
    )
    return grad_z


def _weight_grad_splits(ops: _Operands, class_blocks: int, row_blocks: int) -> int:
    """Row-block groups for dL/dW: about two programs per SM in total, never more than blocks."""
    if ops.blocks.weight_grad_splits is not None:
        return max(1, min(ops.blocks.weight_grad_splits, row_blocks))
    if ops.z.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(ops.z.device).multi_processor_count
    return max(1, min(row_blocks, triton.cdiv(2 * sms, class_blocks)))


def _grad_weight(ops: _Operands, grad_loss: torch.Tensor) -> torch.Tensor:
    """dL/dW [C, D] in W's dtype, through a [splits, C, BLOCK_D] fp32 buffer of partial sums."""
    n, dim = ops.z.shape
    n_classes = ops.weight.shape[0]
    meta = ops.meta()
    class_blocks = triton.cdiv(n_classes, ops.blocks.block_c)
    splits = _weight_grad_splits(ops, class_blocks, triton.cdiv(n, ops.blocks.block_n))
    partial = torch.empty((splits, n_classes, meta["BLOCK_D"]), device=ops.z.device,
                          dtype=torch.float32)
    _grad_w_partial_kernel[(class_blocks, splits)](
        ops.z, ops.weight, ops.z_norm, ops.w_norm, ops.labels, ops.lse, partial,
        n, n_classes, dim, ops.z.stride(0), ops.weight.stride(0), ops.inv_tau, NORM_EPS, **meta,
    )
    grad_w = torch.empty_like(ops.weight)
    block_r = _elementwise_rows(meta["BLOCK_D"])
    _grad_w_finish_kernel[(triton.cdiv(n_classes, block_r),)](
        ops.weight, ops.w_norm, partial, grad_loss, grad_w, n_classes, dim,
        ops.weight.stride(0), grad_w.stride(0), splits, ops.inv_tau, 1.0 / n, NORM_EPS,
        BLOCK_R=block_r, BLOCK_D=meta["BLOCK_D"],
    )
    return grad_w


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
class FusedPrototypeCE(torch.autograd.Function):
    """(mean CE, top-1 correct) of cosine logits; gradients for z and, if it needs one, W."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float,
                blocks: BlockConfig, dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ops = _Operands(z=z, weight=weight, labels=labels, inv_tau=1.0 / tau, blocks=blocks,
                        dot_dtype=dot_dtype)
        loss, correct = _forward(ops)
        ctx.save_for_backward(z, weight, labels, ops.z_norm, ops.w_norm, ops.lse)
        ctx.inv_tau, ctx.blocks, ctx.dot_dtype = ops.inv_tau, blocks, dot_dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, grad_loss: torch.Tensor | None, grad_correct: torch.Tensor | None):
        z, weight, labels, z_norm, w_norm, lse = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None
        ops = _Operands(z=z, weight=weight, labels=labels, inv_tau=ctx.inv_tau,
                        blocks=ctx.blocks, dot_dtype=ctx.dot_dtype, z_norm=z_norm,
                        w_norm=w_norm, lse=lse)
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


def dot_dtype_for(z: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Operand dtype of the kernels' dots: the promoted input dtype (bf16 + fp16 -> fp32),
    except that under autocast an fp32 result becomes the autocast dtype, as torch.matmul
    would. So bf16 projector outputs against fp32 prototypes inside the training step's
    autocast run on tensor cores; the casts happen on chip, norms stay in fp32 from the raw
    inputs and accumulation stays fp32."""
    dtype = torch.promote_types(z.dtype, weight.dtype)
    device_type = z.device.type
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        if autocast_dtype in _TL_DTYPES:
            dtype = autocast_dtype
    return dtype



def fused_prototype_ce(z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float,
                       *, blocks: BlockConfig | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of normalize(z) @ normalize(weight).T / tau and top-1 correctness.

    z: [N, D] (bf16, fp16 or fp32); weight: [C, D] (same choice; the dots' operand dtype is
    `dot_dtype_for(z, weight)`: the promoted dtype, or the autocast dtype under autocast);
    labels: [N] int64 in [0, C); tau > 0. Returns (loss [] fp32, correct [N] bool), matching
    trex_fast.losses.torch_prototype_ce_with_top1 without an N x C tensor. Unlike
    F.cross_entropy there is no ignore_index and labels are not range-checked (that would
    need a host sync): a label outside [0, C) contributes lse as its loss. blocks: tile sizes
    (default: `default_block_config`).
    fp16 limitation: a non-zero row of z or W with norm below 1/65504 overflows an fp16 dot
    operand in the backward (non-finite gradients); zero rows are exact.
    """
    _check_inputs(z, weight, labels, tau)
    dot_dtype = dot_dtype_for(z, weight)
    blocks = blocks or default_block_config(z, weight)
    # Kernels assume unit column stride; .contiguous() copies only if needed (inputs untouched).
    z = z if z.stride(1) == 1 else z.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    return FusedPrototypeCE.apply(z, weight, labels.contiguous(), float(tau), blocks, dot_dtype)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (tools/aot_check.py)
# ---------------------------------------------------------------------------------------------
_FLOAT_ARGS = ("inv_tau", "inv_n", "eps")


def _aot_signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Types of fn's runtime arguments: pointers as given, fp32 scalars, every other int i32."""
    from trex_fast.kernels.aot import pointer

    names = [n for n in fn.arg_names if n not in constexprs]
    return {n: pointer(pointers[n]) if n.endswith("_ptr") else
            "fp32" if n in _FLOAT_ARGS else "i32" for n in names}


def aot_kernels() -> list:
    """The launch configurations the launchers pick at the production shapes (DESIGN.md):
    N=2304, C=1000 and N=16384, C=21841, D=256, bf16 projector outputs against fp32 prototypes
    under bf16 autocast (the training step), and the fp32 variant (precision=fp32)."""
    from trex_fast.kernels.aot import AotKernel

    f32, bf16 = torch.float32, torch.bfloat16
    kernels = []
    for n, c in ((2304, 1000), (16384, 21841)):
        for variant, z_dtype, w_dtype, dot_dtype in (("", bf16, f32, bf16),
                                                     ("fp32,", f32, f32, f32)):
            # default_block_config's CUDA branch at D = 256
            blocks = BlockConfig(block_n=32, block_c=32 if w_dtype == f32 else 64, num_warps=8)
            tag = f"[{variant}N={n},C={c}]"
            meta = dict(BLOCK_N=blocks.block_n, BLOCK_C=blocks.block_c, BLOCK_D=256,
                        DOT_DTYPE=_TL_DTYPES[dot_dtype], DOT_PRECISION="ieee", UPCAST=False)
            ptrs = dict(z_ptr=z_dtype, w_ptr=w_dtype, w_norm_ptr=f32, labels_ptr=torch.int64,
                        z_norm_ptr=f32, lse_ptr=f32, loss_ptr=f32, correct_ptr=torch.int8,
                        grad_loss_ptr=f32, grad_z_ptr=z_dtype, partial_ptr=f32,
                        grad_w_ptr=w_dtype)
            for name, fn in (("fwd", _forward_kernel), ("grad_z", _grad_z_kernel),
                             ("grad_w_partial", _grad_w_partial_kernel)):
                kernels.append(AotKernel(
                    name=f"prototype_ce_{name}{tag}", fn=fn,
                    signature=_aot_signature(fn, ptrs, meta), constexprs=meta,
                    num_warps=blocks.num_warps, has_dot=True))
    return kernels
