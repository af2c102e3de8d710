"""Fused multi-crop stage (issue 13): Triton kernels that make RECIPE.md's crops on the GPU.

Three kernels per batch and crop group (global, local), launched by `multicrop_group`:
1. `_params_kernel`: the group's uniforms [n, NUM_U] -> parameter table [n, NUM_P]
   (pipelines/draws.params_table is its plain-torch spec: boxes with torchvision's 10 tries
   and fallback, coins, jitter factors, the jitter order as ranks of 4 keys, blur sigma).
2. `_resize_kernel`: one program per (crop, 32x32 output tile). Antialiased bicubic
   resampling with PIL's semantics (a = -0.5, support widened by the downscale factor, window
   [floor(c - r + 0.5), floor(c + r + 0.5)) clipped to the box, weights normalised per output
   pixel), evaluated from the crop box over the tile's support window only: the weight tiles
   are computed on chip and applied as two small matrix products per window chunk
   (rows: [32, BK] x [BK, BK]; columns: [32, BK] x [BK, 32]). The flip mirrors the output
   columns' centres. It writes the resized crop in fp16 and the tile's sum of grey after the
   jitter ops that precede contrast in that crop's order (contrast blends with the crop's mean
   grey at that point; deterministic per-tile partial sums, no atomics).
3. `_photometric_kernel`: one program per (crop, tile): colour jitter in the crop's order
   (brightness, contrast, saturation, hue as torchvision's float ops), grayscale, Gaussian
   blur (separable, reflect borders: the tile plus a halo of the blur radius, blurred by two
   products with the Gaussian band matrix), solarize, normalise, cast, channels-last store.

Arithmetic (issue 22): on CUDA the products are tf32 dots, whose operands the tensor cores
truncate to 10 mantissa bits; the interpreter (the CPU tests) computes them in fp32. Every dot
operand is rounded to tf32 here first (`_tf32`, round to nearest even), so the truncation is
exact and both compute the same, and every normaliser is the sum of the rounded weights. The
bf16 output is rounded the same way (`_cast`): CUDA rounds fp32 -> bf16, the interpreter
truncates. docs/PIPELINES.md has the bias this removed.

Inputs never change; nothing synchronises with the host. pipelines/stage/torch_spec.py holds the
plain-torch spec every kernel is tested against.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, CropSpec
from pipelines.stage import draws as D
from pipelines.stage.handoff import CANVAS, PACKED, PLANES, DeviceImages
from pipelines.stage.torch_spec import BICUBIC_A, FILTERS, GRAY_WEIGHTS, blur_radius

TILE = 32  # output tile side (both kernels)
CHUNK = 32  # source window chunk of the resize kernel
NUM_WARPS = 4
RESIZE_WARPS = 8  # six 32x32 fp32 accumulators: 4 warps need 255 registers and spill on sm_80
PHOTOMETRIC_WARPS = 8  # at 4, triton 3.6 (the GPU image's) spills 4-16 B at 255 registers

# Triton reads module globals only as constexprs: the numbers of their one home, wrapped.
_P_TOP = tl.constexpr(D.P_TOP)
_P_LEFT = tl.constexpr(D.P_LEFT)
_P_HEIGHT = tl.constexpr(D.P_HEIGHT)
_P_WIDTH = tl.constexpr(D.P_WIDTH)
_P_FLIP = tl.constexpr(D.P_FLIP)
_P_JITTER = tl.constexpr(D.P_JITTER)
_P_GRAY = tl.constexpr(D.P_GRAY)
_P_BLUR = tl.constexpr(D.P_BLUR)
_P_SOLARIZE = tl.constexpr(D.P_SOLARIZE)
_P_SIGMA = tl.constexpr(D.P_SIGMA)
_P_FACTORS = tl.constexpr(D.P_FACTORS)
_P_ORDER = tl.constexpr(D.P_ORDER)
_NUM_P = tl.constexpr(D.NUM_P)
_NUM_U = tl.constexpr(D.NUM_U)
_U_AREA = tl.constexpr(D.U_AREA)
_U_LOG_RATIO = tl.constexpr(D.U_LOG_RATIO)
_U_TOP = tl.constexpr(D.U_TOP)
_U_LEFT = tl.constexpr(D.U_LEFT)
_U_FLIP = tl.constexpr(D.U_FLIP)
_U_JITTER = tl.constexpr(D.U_JITTER)
_U_GRAY = tl.constexpr(D.U_GRAY)
_U_BLUR = tl.constexpr(D.U_BLUR)
_U_SOLARIZE = tl.constexpr(D.U_SOLARIZE)
_U_FACTORS = tl.constexpr(D.U_FACTORS)
_U_ORDER = tl.constexpr(D.U_ORDER)
_U_SIGMA = tl.constexpr(D.U_SIGMA)
_BRIGHTNESS = tl.constexpr(D.BRIGHTNESS)
_CONTRAST = tl.constexpr(D.CONTRAST)
_SATURATION = tl.constexpr(D.SATURATION)
_LAYOUT_CANVAS, _LAYOUT_PACKED, _LAYOUT_PLANES = (tl.constexpr(v) for v in (CANVAS, PACKED,
                                                                            PLANES))
_G_R, _G_G, _G_B = (tl.constexpr(w) for w in GRAY_WEIGHTS)
_A = tl.constexpr(BICUBIC_A)
_SUPPORT = tl.constexpr(FILTERS["bicubic"][1])
_TF32_DROP = tl.constexpr(13)  # fp32 mantissa bits a tf32 operand does not keep (23 - 10)
_BF16_DROP = tl.constexpr(16)  # and a bf16 value (23 - 7)


# ---------------------------------------------------------------------------------------------
# 1. Parameters
# ---------------------------------------------------------------------------------------------
@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie_to_odd = ((r - x) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
    return tl.where(tie_to_odd, r - 1.0, r)


@triton.jit
def _params_kernel(u_ptr, sizes_ptr, size_stride, consts_ptr, out_ptr, n, batch,
                   TRIES: tl.constexpr, BLOCK: tl.constexpr):
    """consts (float64): scale lo/hi, log ratio lo/hi, ratio min/max, the 5 coin
    probabilities, 4 x (factor lo, hi), sigma lo/hi (see _group_consts)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    image = rows % batch
    height = tl.load(sizes_ptr + image * size_stride, mask=ok, other=1).to(tl.float64)
    width = tl.load(sizes_ptr + image * size_stride + 1, mask=ok, other=1).to(tl.float64)
    scale_lo, scale_hi = tl.load(consts_ptr + 0), tl.load(consts_ptr + 1)
    log_lo, log_hi = tl.load(consts_ptr + 2), tl.load(consts_ptr + 3)
    ratio_min, ratio_max = tl.load(consts_ptr + 4), tl.load(consts_ptr + 5)
    u_row = u_ptr + rows.to(tl.int64) * _NUM_U
    found = rows < 0
    zero = tl.zeros([BLOCK], dtype=tl.float64)
    top, left, box_h, box_w = zero, zero, zero, zero
    for t in tl.static_range(TRIES):
        u_area = tl.load(u_row + _U_AREA + t, mask=ok, other=0.0).to(tl.float64)
        u_ratio = tl.load(u_row + _U_LOG_RATIO + t, mask=ok, other=0.0).to(tl.float64)
        u_top = tl.load(u_row + _U_TOP + t, mask=ok, other=0.0).to(tl.float64)
        u_left = tl.load(u_row + _U_LEFT + t, mask=ok, other=0.0).to(tl.float64)
        area = height * width * (scale_lo + (scale_hi - scale_lo) * u_area)
        aspect = tl.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = _round_half_even(tl.sqrt(area * aspect))
        h = _round_half_even(tl.sqrt(area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        take = fits & (~found)
        top = tl.where(take, tl.floor(u_top * (height - h + 1)), top)
        left = tl.where(take, tl.floor(u_left * (width - w + 1)), left)
        box_h, box_w = tl.where(take, h, box_h), tl.where(take, w, box_w)
        found = found | fits
    in_ratio = width / height
    fb_w = tl.where(in_ratio > ratio_max, _round_half_even(height * ratio_max), width)
    fb_h = tl.where(in_ratio < ratio_min, _round_half_even(width / ratio_min), height)
    out_row = out_ptr + rows.to(tl.int64) * _NUM_P
    tl.store(out_row + _P_TOP, tl.where(found, top, tl.floor((height - fb_h) / 2)), mask=ok)
    tl.store(out_row + _P_LEFT, tl.where(found, left, tl.floor((width - fb_w) / 2)), mask=ok)
    tl.store(out_row + _P_HEIGHT, tl.where(found, box_h, fb_h), mask=ok)
    tl.store(out_row + _P_WIDTH, tl.where(found, box_w, fb_w), mask=ok)
    _coin(u_row + _U_FLIP, out_row + _P_FLIP, consts_ptr + 6, ok)
    _coin(u_row + _U_JITTER, out_row + _P_JITTER, consts_ptr + 7, ok)
    _coin(u_row + _U_GRAY, out_row + _P_GRAY, consts_ptr + 8, ok)
    _coin(u_row + _U_BLUR, out_row + _P_BLUR, consts_ptr + 9, ok)
    _coin(u_row + _U_SOLARIZE, out_row + _P_SOLARIZE, consts_ptr + 10, ok)
    for k in tl.static_range(4):
        lo, hi = tl.load(consts_ptr + 11 + 2 * k), tl.load(consts_ptr + 12 + 2 * k)
        u = tl.load(u_row + _U_FACTORS + k, mask=ok, other=0.0)
        tl.store(out_row + _P_FACTORS + k, lo.to(tl.float32) + (hi - lo).to(tl.float32) * u,
                 mask=ok)
    _store_order(u_row + _U_ORDER, out_row + _P_ORDER, ok)
    lo, hi = tl.load(consts_ptr + 19), tl.load(consts_ptr + 20)
    u = tl.load(u_row + _U_SIGMA, mask=ok, other=0.0)
    tl.store(out_row + _P_SIGMA, lo.to(tl.float32) + (hi - lo).to(tl.float32) * u, mask=ok)


@triton.jit
def _coin(u_ptr, out_ptr, p_ptr, ok):
    u = tl.load(u_ptr, mask=ok, other=1.0)
    tl.store(out_ptr, (u < tl.load(p_ptr).to(tl.float32)).to(tl.float32), mask=ok)


@triton.jit
def _store_order(keys_ptr, order_ptr, ok):
    """order[s] = the op whose key has rank s (ascending; ties by op index): a stable argsort
    of the 4 keys, written as rank counts."""
    k0 = tl.load(keys_ptr + 0, mask=ok, other=0.0)
    k1 = tl.load(keys_ptr + 1, mask=ok, other=0.0)
    k2 = tl.load(keys_ptr + 2, mask=ok, other=0.0)
    k3 = tl.load(keys_ptr + 3, mask=ok, other=0.0)
    r1 = (k0 <= k1).to(tl.int32) + (k2 < k1).to(tl.int32) + (k3 < k1).to(tl.int32)
    r2 = (k0 <= k2).to(tl.int32) + (k1 <= k2).to(tl.int32) + (k3 < k2).to(tl.int32)
    r3 = (k0 <= k3).to(tl.int32) + (k1 <= k3).to(tl.int32) + (k2 <= k3).to(tl.int32)
    for s in tl.static_range(4):
        op = (r1 == s).to(tl.int32) + 2 * (r2 == s).to(tl.int32) + 3 * (r3 == s).to(tl.int32)
        tl.store(order_ptr + s, op.to(tl.float32), mask=ok)  # op 0 where no other rank is s


# ---------------------------------------------------------------------------------------------
# Rounding that the GPU and the interpreter do alike (issue 22)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _round_mantissa(x, DROP: tl.constexpr):
    """fp32 x rounded to nearest (ties to even) with its low DROP mantissa bits zero, by
    integer ops on its bits (finite x; a carry into the exponent is the right rounding)."""
    bits = x.to(tl.uint32, bitcast=True)
    below_half = (tl.full([], 1, tl.uint32) << (DROP - 1)) - 1
    half = below_half + ((bits >> DROP) & 1)  # ties go to the even neighbour
    return (((bits + half) >> DROP) << DROP).to(tl.float32, bitcast=True)


@triton.jit
def _tf32(x):
    """A tf32 dot operand, rounded to nearest: the tensor cores read 10 mantissa bits and
    drop the other 13 (truncation, a bias toward 0), which leaves a rounded value unchanged,
    so the dot computes on the GPU what it computes in the interpreter's IEEE fp32."""
    return _round_mantissa(x, _TF32_DROP)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounded to nearest even also in the interpreter, which truncates
    fp32 -> bf16 (the GPU rounds: the two would differ by up to 1 bf16 ulp, biased)."""
    if dtype == tl.bfloat16:
        x = _round_mantissa(x, _BF16_DROP)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Shared colour helpers (torchvision.transforms.v2.functional float semantics)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gray(r, g, b):
    return _G_R * r + _G_G * g + _G_B * b


@triton.jit
def _blend(x, target, f):
    return tl.minimum(tl.maximum(f * x + (1.0 - f) * target, 0.0), 1.0)


@triton.jit
def _hue(r, g, b, shift):
    """adjust_hue: RGB -> HSV, rotate the hue by `shift` (turns), HSV -> RGB."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    span = maxc - minc
    grey = span == 0
    sat = span / tl.where(grey, 1.0, maxc)
    safe = tl.where(grey, 1.0, span)
    h = tl.where(maxc == r, (g - b) / safe,
                 tl.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = tl.where(grey, 0.0, h) / 6.0 + shift
    h = h - tl.floor(h)
    vs = maxc * sat
    return (_hsv_channel(maxc, vs, h, 5.0), _hsv_channel(maxc, vs, h, 3.0),
            _hsv_channel(maxc, vs, h, 1.0))


@triton.jit
def _hsv_channel(v, vs, h, offset):
    """HSV -> RGB, one channel: v - v*s*clamp(min(k, 4 - k), 0, 1), k = (offset + 6h) mod 6."""
    k = offset + 6.0 * h
    k = k - 6.0 * tl.floor(k / 6.0)
    return v - vs * tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)


@triton.jit
def _jitter_op(r, g, b, op, factor, mean_grey):
    """One ColorJitter op (0 brightness, 1 contrast with the crop's mean grey, 2 saturation,
    3 hue) with the crop's factor."""
    if op == _BRIGHTNESS:
        r, g, b = _blend(r, 0.0, factor), _blend(g, 0.0, factor), _blend(b, 0.0, factor)
    elif op == _CONTRAST:
        r, g, b = (_blend(r, mean_grey, factor), _blend(g, mean_grey, factor),
                   _blend(b, mean_grey, factor))
    elif op == _SATURATION:
        grey = _gray(r, g, b)
        r, g, b = _blend(r, grey, factor), _blend(g, grey, factor), _blend(b, grey, factor)
    else:
        r, g, b = _hue(r, g, b, factor)
    return r, g, b


@triton.jit
def _jitter(r, g, b, prm, mean_grey, BEFORE_CONTRAST: tl.constexpr):
    """The crop's jitter ops in its order; BEFORE_CONTRAST: only those before contrast."""
    if tl.load(prm + _P_JITTER) != 0:
        for s in tl.static_range(4):
            op = tl.load(prm + _P_ORDER + s).to(tl.int32)
            if BEFORE_CONTRAST:
                todo = op != _CONTRAST
                for before in tl.static_range(4):  # stop at contrast's slot
                    if before < s:
                        todo = todo & (tl.load(prm + _P_ORDER + before).to(tl.int32)
                                       != _CONTRAST)
            else:
                todo = op >= 0
            if todo:
                r, g, b = _jitter_op(r, g, b, op, tl.load(prm + _P_FACTORS + op), mean_grey)
    return r, g, b


# ---------------------------------------------------------------------------------------------
# 2. Crop + antialiased bicubic resize (+ flip)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bicubic(x):
    x = tl.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1.0  # (a + 2) x^3 - (a + 3) x^2 + 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * _A  # a (x^3 - 5 x^2 + 8 x - 4)
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _axis(out_pos, out_size, length):
    """PIL's resampling window of output pixels out_pos [T] (float) of an axis of `length`
    box pixels resized to out_size: centre, [lo, hi) and the kernel's scale."""
    scale = length / out_size
    filter_scale = tl.maximum(scale, 1.0)
    reach = _SUPPORT * filter_scale
    centre = (out_pos + 0.5) * scale
    lo = tl.maximum(tl.floor(centre - reach + 0.5), 0.0)
    hi = tl.minimum(tl.floor(centre + reach + 0.5), length)
    return centre, lo, hi, filter_scale


@triton.jit
def _weights(centre, lo, hi, filter_scale, pos):
    """Un-normalised weights [T, K] of box pixels pos [K] for the output pixels of `centre`,
    tf32-rounded: the dots read them as they are summed for the normaliser."""
    w = _bicubic((pos[None, :] - centre[:, None] + 0.5) / filter_scale)
    inside = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
    return _tf32(tl.where(inside, w, 0.0))


@triton.jit
def _window(lo, hi, valid):
    """[start, end) of box pixels that any valid output pixel of the tile reads."""
    start = tl.min(tl.where(valid, lo, 1e9), axis=0)
    end = tl.max(tl.where(valid, hi, 0.0), axis=0)
    return start.to(tl.int32), end.to(tl.int32)


@triton.jit
def _weight_sums(centre, lo, hi, filter_scale, start, end, BK: tl.constexpr):
    total = tl.zeros_like(centre)
    for k0 in range(start, end, BK):
        pos = (k0 + tl.arange(0, BK)).to(tl.float32)
        total += tl.sum(_weights(centre, lo, hi, filter_scale, pos), axis=1)
    return total


@triton.jit
def _resize_kernel(src_ptr, offsets_ptr, offset_stride, sizes_ptr, size_stride, image_stride,
                   canvas_width,
                   params_ptr, partial_ptr, mid_ptr, batch, out_size,
                   LAYOUT: tl.constexpr, TILES_X: tl.constexpr, BO: tl.constexpr,
                   BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    crop, tile = tl.program_id(0), tl.program_id(1)
    prm = params_ptr + crop * _NUM_P
    top, left = tl.load(prm + _P_TOP).to(tl.int32), tl.load(prm + _P_LEFT).to(tl.int32)
    box_h, box_w = tl.load(prm + _P_HEIGHT), tl.load(prm + _P_WIDTH)
    flip = tl.load(prm + _P_FLIP) != 0
    image = crop % batch
    # where pixel (y, x, c) of the image lies: base + y * row + x * step + c * plane
    if LAYOUT == _LAYOUT_PLANES:
        base = tl.load(offsets_ptr + image * offset_stride)
        row = tl.load(sizes_ptr + image * size_stride + 1).to(tl.int64)
        step, plane = 1, tl.load(sizes_ptr + image * size_stride).to(tl.int64) * row
    else:
        base = image.to(tl.int64) * image_stride
        if LAYOUT == _LAYOUT_PACKED:
            row = 3 * tl.load(sizes_ptr + image * size_stride + 1).to(tl.int64)
        else:
            row = canvas_width * 3 + tl.zeros([], dtype=tl.int64)  # an int 1 arrives as constexpr
        step, plane = 3, 1

    oy = (tile // TILES_X) * BO + tl.arange(0, BO)
    ox = (tile % TILES_X) * BO + tl.arange(0, BO)
    valid_y, valid_x = oy < out_size, ox < out_size
    cy, lo_y, hi_y, fs_y = _axis(oy.to(tl.float32), out_size, box_h)
    ox_src = tl.where(flip, out_size - 1 - ox, ox)  # a flipped crop reads mirrored columns
    cx, lo_x, hi_x, fs_x = _axis(ox_src.to(tl.float32), out_size, box_w)
    y0, y1 = _window(lo_y, hi_y, valid_y)
    x0, x1 = _window(lo_x, hi_x, valid_x)

    acc_r = tl.zeros([BO, BO], dtype=tl.float32)
    acc_g = tl.zeros([BO, BO], dtype=tl.float32)
    acc_b = tl.zeros([BO, BO], dtype=tl.float32)
    for xk in range(x0, x1, BK):
        px = xk + tl.arange(0, BK)
        wx = _weights(cx, lo_x, hi_x, fs_x, px.to(tl.float32))  # [BO (ox), BK]
        tmp_r = tl.zeros([BO, BK], dtype=tl.float32)
        tmp_g = tl.zeros([BO, BK], dtype=tl.float32)
        tmp_b = tl.zeros([BO, BK], dtype=tl.float32)
        for yk in range(y0, y1, BK):
            py = yk + tl.arange(0, BK)
            wy = _weights(cy, lo_y, hi_y, fs_y, py.to(tl.float32))  # [BO (oy), BK]
            mask = (py < y1)[:, None] & (px < x1)[None, :]
            at = (src_ptr + base + (top + py).to(tl.int64)[:, None] * row
                  + (left + px).to(tl.int64)[None, :] * step)
            tmp_r += tl.dot(wy, tl.load(at, mask=mask, other=0).to(tl.float32),
                            input_precision=DOT_PRECISION)
            tmp_g += tl.dot(wy, tl.load(at + plane, mask=mask, other=0).to(tl.float32),
                            input_precision=DOT_PRECISION)
            tmp_b += tl.dot(wy, tl.load(at + 2 * plane, mask=mask, other=0).to(tl.float32),
                            input_precision=DOT_PRECISION)
        wxt = tl.trans(wx)  # uint8 pixels are exact in tf32; the column pass reads tmp rounded
        acc_r += tl.dot(_tf32(tmp_r), wxt, input_precision=DOT_PRECISION)
        acc_g += tl.dot(_tf32(tmp_g), wxt, input_precision=DOT_PRECISION)
        acc_b += tl.dot(_tf32(tmp_b), wxt, input_precision=DOT_PRECISION)

    norm = (_weight_sums(cy, lo_y, hi_y, fs_y, y0, y1, BK)[:, None]
            * _weight_sums(cx, lo_x, hi_x, fs_x, x0, x1, BK)[None, :]) * 255.0
    r = tl.minimum(tl.maximum(acc_r / norm, 0.0), 1.0)
    g = tl.minimum(tl.maximum(acc_g / norm, 0.0), 1.0)
    b = tl.minimum(tl.maximum(acc_b / norm, 0.0), 1.0)
    valid = valid_y[:, None] & valid_x[None, :]

    # contrast's mean grey: this tile's share, after the ops before contrast in the order
    jr, jg, jb = _jitter(r, g, b, prm, 0.0, BEFORE_CONTRAST=True)
    tl.store(partial_ptr + crop * (TILES_X * TILES_X) + tile,
             tl.sum(tl.sum(tl.where(valid, _gray(jr, jg, jb), 0.0), axis=1), axis=0))
    plane_out = out_size * out_size
    at = mid_ptr + crop.to(tl.int64) * 3 * plane_out + oy[:, None] * out_size + ox[None, :]
    tl.store(at, r.to(mid_ptr.dtype.element_ty), mask=valid)
    tl.store(at + plane_out, g.to(mid_ptr.dtype.element_ty), mask=valid)
    tl.store(at + 2 * plane_out, b.to(mid_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# 3. Jitter, grayscale, blur, solarize, normalise
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_rgb(mid_ptr, crop, ys, xs, out_size):
    plane = out_size * out_size
    at = mid_ptr + crop.to(tl.int64) * 3 * plane + ys[:, None] * out_size + xs[None, :]
    return (tl.load(at).to(tl.float32), tl.load(at + plane).to(tl.float32),
            tl.load(at + 2 * plane).to(tl.float32))


@triton.jit
def _colour(r, g, b, prm, mean_grey):
    """Jitter in the crop's order, then grayscale (both pixel-wise)."""
    r, g, b = _jitter(r, g, b, prm, mean_grey, BEFORE_CONTRAST=False)
    if tl.load(prm + _P_GRAY) != 0:
        grey = _gray(r, g, b)
        r, g, b = grey, grey, grey
    return r, g, b


@triton.jit
def _reflect(i, n):
    """torch's 'reflect' padding index (no edge repeat), clamped for unused halo pixels."""
    i = tl.where(i < 0, -i, i)
    i = tl.where(i > n - 1, 2 * (n - 1) - i, i)
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _gauss(t, sigma):
    """Un-normalised Gaussian taps at offsets t, tf32-rounded (as the dots read them)."""
    return _tf32(tl.exp(-0.5 * (t / sigma) * (t / sigma)))


@triton.jit
def _blur_planes(band, x, DOT_PRECISION: tl.constexpr):
    """band [BO, BH] @ x [BH, BH] @ band^T; band and x come tf32-rounded, the rows are."""
    rows = tl.dot(band, x, input_precision=DOT_PRECISION)
    return tl.dot(_tf32(rows), tl.trans(band), input_precision=DOT_PRECISION)


@triton.jit
def _photometric_kernel(mid_ptr, params_ptr, partial_ptr, out_ptr, out_size,
                        MEAN_R: tl.constexpr, MEAN_G: tl.constexpr, MEAN_B: tl.constexpr,
                        STD_R: tl.constexpr, STD_G: tl.constexpr, STD_B: tl.constexpr,
                        THRESHOLD: tl.constexpr, RADIUS: tl.constexpr,
                        HAS_BLUR: tl.constexpr, HAS_SOLARIZE: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, TILES_X: tl.constexpr,
                        TILES_PAD: tl.constexpr, BO: tl.constexpr, BH: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    crop, tile = tl.program_id(0), tl.program_id(1)
    prm = params_ptr + crop * _NUM_P
    n_tiles = TILES_X * TILES_X
    t = tl.arange(0, TILES_PAD)
    partial = tl.load(partial_ptr + crop * n_tiles + t, mask=t < n_tiles, other=0.0)
    mean_grey = tl.sum(partial, axis=0) / (out_size * out_size)
    oy = (tile // TILES_X) * BO + tl.arange(0, BO)
    ox = (tile % TILES_X) * BO + tl.arange(0, BO)
    valid = (oy < out_size)[:, None] & (ox < out_size)[None, :]

    blurred = False
    if HAS_BLUR:
        blurred = tl.load(prm + _P_BLUR) != 0
    if blurred:
        # the tile plus a halo of RADIUS, reflected at the crop's borders, coloured, then
        # Gaussian-blurred by out = G @ X @ G^T with G[i, j] = k(j - i - RADIUS)
        h = tl.arange(0, BH)
        hy = _reflect((tile // TILES_X) * BO - RADIUS + h, out_size)
        hx = _reflect((tile % TILES_X) * BO - RADIUS + h, out_size)
        r, g, b = _load_rgb(mid_ptr, crop, hy, hx, out_size)
        r, g, b = _colour(r, g, b, prm, mean_grey)
        r, g, b = _tf32(r), _tf32(g), _tf32(b)  # dot operands
        sigma = tl.load(prm + _P_SIGMA)
        taps = (h - RADIUS).to(tl.float32)
        norm = tl.sum(tl.where(h <= 2 * RADIUS, _gauss(taps, sigma), 0.0), axis=0)
        d = (h[None, :] - tl.arange(0, BO)[:, None] - RADIUS).to(tl.float32)  # [BO, BH]
        band = tl.where(tl.abs(d) <= RADIUS, _gauss(d, sigma), 0.0)
        gain = 1.0 / (norm * norm)  # the taps the dots read sum to 1 after it: no bias
        r = _blur_planes(band, r, DOT_PRECISION) * gain
        g = _blur_planes(band, g, DOT_PRECISION) * gain
        b = _blur_planes(band, b, DOT_PRECISION) * gain
    else:
        r, g, b = _load_rgb(mid_ptr, crop, tl.minimum(oy, out_size - 1),
                            tl.minimum(ox, out_size - 1), out_size)
        r, g, b = _colour(r, g, b, prm, mean_grey)

    if HAS_SOLARIZE:
        if tl.load(prm + _P_SOLARIZE) != 0:
            r = tl.where(r >= THRESHOLD, 1.0 - r, r)
            g = tl.where(g >= THRESHOLD, 1.0 - g, g)
            b = tl.where(b >= THRESHOLD, 1.0 - b, b)
    plane = out_size * out_size
    pixel = oy[:, None] * out_size + ox[None, :]
    if CHANNELS_LAST:  # [N, S, S, 3] memory: the channels-last strides of [N, 3, S, S]
        at, c_step = out_ptr + crop.to(tl.int64) * 3 * plane + pixel * 3, 1
    else:
        at, c_step = out_ptr + crop.to(tl.int64) * 3 * plane + pixel, plane
    dtype = out_ptr.dtype.element_ty
    tl.store(at, _cast((r - MEAN_R) / STD_R, dtype), mask=valid)
    tl.store(at + c_step, _cast((g - MEAN_G) / STD_G, dtype), mask=valid)
    tl.store(at + 2 * c_step, _cast((b - MEAN_B) / STD_B, dtype), mask=valid)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
PARAMS_BLOCK = 128


@functools.cache
def _group_consts(group: CropSpec, device: torch.device) -> torch.Tensor:
    """The group's numbers for the parameter kernel, float64, made once per device."""
    values = [*group.scale, math.log(group.ratio[0]), math.log(group.ratio[1]),
              min(group.ratio), max(group.ratio), group.flip_p, group.jitter_p,
              group.grayscale_p, group.blur_p, group.solarize_p,
              *[v for bounds in D.jitter_bounds(group) for v in bounds], *group.blur_sigma]
    return torch.tensor(values, dtype=torch.float64, device=device)


def _dot_precision(device: torch.device) -> str:
    """tf32 tensor cores on CUDA (exact: the operands are tf32-rounded), fp32 elsewhere."""
    return "tf32" if device.type == "cuda" else "ieee"


def params(u: torch.Tensor, sizes: torch.Tensor, group: CropSpec) -> torch.Tensor:
    """u [n, NUM_U] (the group's rows), sizes [B, 2] -> parameter table [n, NUM_P] (one launch;
    equal to draws.params_table)."""
    n = u.shape[0]
    table = torch.empty(n, D.NUM_P, dtype=torch.float32, device=u.device)
    _params_kernel[(triton.cdiv(n, PARAMS_BLOCK),)](
        u, sizes, sizes.stride(0), _group_consts(group, u.device), table, n, sizes.shape[0],
        TRIES=D.RRC_TRIES, BLOCK=PARAMS_BLOCK, num_warps=NUM_WARPS)
    return table


def resize(images: DeviceImages, table: torch.Tensor, out_size: int,
           mid_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop + resize + flip: -> (crops [n, 3, S, S] in [0, 1], mid_dtype; per-tile grey sums
    before contrast [n, tiles])."""
    n, device = table.shape[0], table.device
    tiles_x = triton.cdiv(out_size, TILE)
    mid = torch.empty(n, 3, out_size, out_size, dtype=mid_dtype, device=device)
    partial = torch.empty(n, tiles_x * tiles_x, dtype=torch.float32, device=device)
    offsets = images.offsets if images.layout == PLANES else images.sizes
    _resize_kernel[(n, tiles_x * tiles_x)](
        images.data, offsets, offsets.stride(0), images.sizes, images.sizes.stride(0),
        images.image_stride,
        images.canvas_hw[1], table, partial, mid, images.batch_size, out_size,
        LAYOUT=images.layout, TILES_X=tiles_x, BO=TILE, BK=CHUNK,
        DOT_PRECISION=_dot_precision(device), num_warps=RESIZE_WARPS)
    return mid, partial


def photometric(mid: torch.Tensor, partial: torch.Tensor, table: torch.Tensor, group: CropSpec,
                dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Jitter, grayscale, blur, solarize, normalise -> [n, 3, S, S] in `dtype`."""
    n, _, size, _ = mid.shape
    tiles_x = triton.cdiv(size, TILE)
    radius = blur_radius(group)
    if group.blur_p > 0 and radius >= size:
        raise ValueError(f"blur radius {radius} needs crops larger than {radius}, got {size}")
    out = torch.empty(n, 3, size, size, dtype=dtype, device=mid.device,
                      memory_format=torch.channels_last if channels_last else
                      torch.contiguous_format)
    _photometric_kernel[(n, tiles_x * tiles_x)](
        mid, table, partial, out, size, *IMAGENET_MEAN, *IMAGENET_STD,
        THRESHOLD=group.solarize_threshold / 255.0, RADIUS=radius,
        HAS_BLUR=group.blur_p > 0, HAS_SOLARIZE=group.solarize_p > 0,
        CHANNELS_LAST=channels_last, TILES_X=tiles_x,
        TILES_PAD=triton.next_power_of_2(tiles_x * tiles_x), BO=TILE,
        BH=triton.next_power_of_2(TILE + 2 * radius), DOT_PRECISION=_dot_precision(mid.device),
        num_warps=PHOTOMETRIC_WARPS)
    return out


def multicrop_group(images: DeviceImages, u: torch.Tensor, group: CropSpec, dtype: torch.dtype,
                    channels_last: bool) -> torch.Tensor:
    """One crop group of the batch from its uniforms: 3 launches."""
    table = params(u, images.sizes, group)
    mid, partial = resize(images, table, group.size)
    return photometric(mid, partial, table, group, dtype, channels_last)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (tools/aot_check.py)
# ---------------------------------------------------------------------------------------------
def aot_kernels() -> list:
    """The launches of one production batch: B = 256 images in 500 x 500 slots, t-ReX crops
    (1 x 224 with solarize, 8 x 96 without), fp16 intermediate, bf16 channels-last output, on
    CUDA (tf32 dots); the resize kernel for each source layout."""
    from pipelines.stage.aot import for_launch

    batch, slot = 256, 500 * 500 * 3
    kernels = []
    for name, count, size, solarize in (("global", 1, 224, True), ("local", 8, 96, False)):
        n, tiles_x = count * batch, triton.cdiv(size, TILE)
        group = CropSpec(count, size, (0.25, 1.0), blur_p=0.5,
                         solarize_p=0.2 if solarize else 0.0)
        kernels.append(for_launch(
            f"multicrop_params[{name},n={n}]", _params_kernel,
            {"u_ptr": torch.float32, "sizes_ptr": torch.int64, "consts_ptr": torch.float64,
             "out_ptr": torch.float32}, {"size_stride": 2, "n": n, "batch": batch},
            {"TRIES": D.RRC_TRIES, "BLOCK": PARAMS_BLOCK}, num_warps=NUM_WARPS))
        for layout, layout_name in ((PACKED, "packed"), (PLANES, "planes"), (CANVAS, "canvas")):
            kernels.append(for_launch(
                f"multicrop_resize[{name},{layout_name},S={size}]", _resize_kernel,
                {"src_ptr": torch.uint8, "offsets_ptr": torch.int64, "sizes_ptr": torch.int64,
                 "params_ptr": torch.float32, "partial_ptr": torch.float32,
                 "mid_ptr": torch.float16},
                {"offset_stride": 3 if layout == PLANES else 2, "size_stride": 3 if
                 layout == PLANES else 2, "image_stride": 0 if layout == PLANES else slot,
                 "canvas_width": 500, "batch": batch, "out_size": size},
                {"LAYOUT": layout, "TILES_X": tiles_x, "BO": TILE, "BK": CHUNK,
                 "DOT_PRECISION": "tf32"}, num_warps=RESIZE_WARPS, has_dot=True))
        radius = blur_radius(group)
        kernels.append(for_launch(
            f"multicrop_photometric[{name},S={size}]", _photometric_kernel,
            {"mid_ptr": torch.float16, "params_ptr": torch.float32,
             "partial_ptr": torch.float32, "out_ptr": torch.bfloat16}, {"out_size": size},
            {"MEAN_R": IMAGENET_MEAN[0], "MEAN_G": IMAGENET_MEAN[1],
             "MEAN_B": IMAGENET_MEAN[2], "STD_R": IMAGENET_STD[0], "STD_G": IMAGENET_STD[1],
             "STD_B": IMAGENET_STD[2], "THRESHOLD": group.solarize_threshold / 255.0,
             "RADIUS": radius, "HAS_BLUR": True, "HAS_SOLARIZE": solarize,
             "CHANNELS_LAST": True, "TILES_X": tiles_x,
             "TILES_PAD": triton.next_power_of_2(tiles_x * tiles_x), "BO": TILE,
             "BH": triton.next_power_of_2(TILE + 2 * radius), "DOT_PRECISION": "tf32"},
            num_warps=PHOTOMETRIC_WARPS, has_dot=True))
    return kernels
