"""Batched, device-agnostic multi-crop augmentation from decoded images (DESIGN.md, issue #4).

Input: a uint8 canvas [B, Hc, Wc, 3] holding each decoded image at its top-left corner, plus
the true sizes [B, 2] (height, width). Output: a MultiCropBatch with RECIPE.md's augmentations.
Plain torch, no Python loop over samples; it runs the same on CPU (tests) and CUDA.

How each step maps onto the reference (pipelines/loaders/reference.py, torchvision on PIL images):
- RandomResizedCrop boxes: torchvision's get_params, vectorised: 10 tries per crop as a
  [N, 10] tensor, the first valid one wins, else the same central fallback.
- Crop + bicubic resize: PIL's antialiased resampling (bicubic a=-0.5, support scaled by the
  downscale factor, pixels outside the box never read) written as per-crop [out, in] weight
  matrices applied with two batched matmuls. The flip is folded into the column matrix (a
  flip commutes with every later op: they are per-pixel, use the image mean, or blur with a
  symmetric kernel and reflect padding). Unlike PIL, no rounding to uint8 in between.
- Colour jitter: torchvision.transforms.v2.functional maths on [0, 1] floats with per-sample
  factors; the random order is a per-sample permutation. Brightness, contrast and saturation
  are all blends, so each slot is one masked blend; hue runs once, with the blends ordered
  before it and after it per sample.
- Gaussian blur: a true Gaussian (kernel 2*ceil(3*sigma_max)+1, reflect padding, as
  torchvision's gaussian_blur); the reference's PIL GaussianBlur(radius=sigma) approximates
  the same Gaussian (standard deviation sigma) with box passes and edge padding.
- Solarize: x >= 128/255 -> 1 - x on [0, 1] floats, as PIL's solarize(128) on uint8.
Random parameters: one uniform tensor per batch from a generator on the device seeded by
(seed, rank, epoch, step), mapped to a parameter table by pipelines/stage/draws.py; impl="triton"
(pipelines/stage/triton_multicrop.py) reads the same table, so both make the same draws.

This module is the executable spec of those kernels and the CPU path (impl="torch"); its
arithmetic is float32 like theirs. The dispatcher between the two is pipelines/stage/dispatch.py.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.batch import mean_std
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, CropSpec, MultiCropSpec  # noqa: F401
from pipelines.stage import draws as D

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale
BICUBIC_A = -0.5  # PIL's (and torch's antialiased) bicubic coefficient


# ---------------------------------------------------------------- crop boxes
def sample_boxes(sizes: torch.Tensor, count: int, scale: tuple[float, float],
                 ratio: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop boxes for `count` crops of each image, crop-major, drawn as the stage
    draws them (pipelines/stage/draws.py). sizes: [B, 2] (height, width).
    Returns [count*B, 4] int64 (top, left, height, width)."""
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"sizes must be [B, 2] (height, width), got {tuple(sizes.shape)}")
    u = D.draw_uniforms(count * sizes.shape[0], gen)
    return D.boxes_from_uniforms(u, sizes.to(u.device).repeat(count, 1), scale, ratio).long()


# ---------------------------------------------------------------- antialiased resampling
def _bicubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_full: torch.Tensor,
                     offset: torch.Tensor, out_size: int, canvas: int,
                     kind: str = "bicubic") -> torch.Tensor:
    """PIL-style antialiased resampling of one axis as dense matrices [N, out_size, canvas].

    Input pixels [start, start+length) of the canvas are resized to `out_full` pixels, of
    which rows [offset, offset+out_size) are kept (offset > 0 makes a centre crop after the
    resize). All arguments but out_size/canvas/kind are [N] tensors.
    """
    if kind not in FILTERS:
        raise ValueError(f"kind must be one of {sorted(FILTERS)}, got {kind!r}")
    kernel, support = FILTERS[kind]
    start, length, out_full, offset = (t.to(torch.float32)[:, None]
                                       for t in (start, length, out_full, offset))  # [N, 1]
    scale = length / out_full  # input pixels per output pixel
    filter_scale = scale.clamp(min=1.0)  # widen the kernel when downscaling: antialias
    reach = support * filter_scale
    dev = start.device
    centre = (torch.arange(out_size, device=dev, dtype=torch.float32) + offset + 0.5) * scale
    lo = torch.floor(centre - reach + 0.5).clamp(min=0)[..., None]  # PIL's window
    hi = torch.minimum(torch.floor(centre + reach + 0.5), length)[..., None]
    x = (torch.arange(canvas, device=dev, dtype=torch.float32) - start)[:, None, :]  # box coords
    weights = kernel((x - centre[..., None] + 0.5) / filter_scale[..., None])
    weights = weights * ((x >= lo) & (x < hi))  # never read outside the box
    return weights / weights.sum(dim=-1, keepdim=True)


def resize_boxes(images: torch.Tensor, row_weights: torch.Tensor,
                 col_weights: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] float, weights [K*B, out, H] and [K*B, out, W] (crop-major)
    -> [K*B, 3, out, out]: crop k of image b is sample k*B + b. Two batched matmuls."""
    b = images.shape[0]
    k = row_weights.shape[0] // b
    rows = row_weights.view(k, b, *row_weights.shape[1:])  # [K, B, out, H]
    cols = col_weights.view(k, b, *col_weights.shape[1:])  # [K, B, out, W]
    tmp = torch.einsum("kboh,bchw->kbcow", rows, images)  # [K, B, 3, out, W]
    out = torch.einsum("kbcow,kbpw->kbcop", tmp, cols)  # [K, B, 3, out, out]
    return out.reshape(k * b, 3, out.shape[-2], out.shape[-1]).clamp(0.0, 1.0)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int,
                flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each box (top, left, height, width) and bicubic-resize it to size x size."""
    _, _, h, w = images.shape
    zeros = torch.zeros_like(boxes[:, 0])
    full = torch.full_like(zeros, size)
    rows = resample_weights(boxes[:, 0], boxes[:, 2], full, zeros, size, h)
    cols = resample_weights(boxes[:, 1], boxes[:, 3], full, zeros, size, w)
    if flip is not None:  # a flipped crop = the column matrix read backwards
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    return resize_boxes(images, rows.to(images.dtype), cols.to(images.dtype))


def unpack_canvas(packed: torch.Tensor, sizes: torch.Tensor, height: int,
                  width: int) -> torch.Tensor:
    """Packed decodes [B, >= height*width*3] uint8 (image b's h*w*3 bytes first, row stride w)
    -> canvas [B, height, width, 3] with each image at the top-left (zeros elsewhere).
    The FFCV decoder writes packed images so the CPU does no copy after the decode."""
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] < height * width * 3:
        raise ValueError(f"packed must be uint8 [B, >= {height * width * 3}], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    b = packed.shape[0]
    sizes = sizes.to(packed.device).long()
    y = torch.arange(height, device=packed.device).view(1, -1, 1)
    x = torch.arange(width, device=packed.device).view(1, 1, -1)
    h, w = sizes[:, 0].view(b, 1, 1), sizes[:, 1].view(b, 1, 1)
    inside = (y < h) & (x < w)  # [B, H, W]
    index = torch.where(inside, y * w + x, 0).view(b, -1, 1).expand(-1, -1, 3)
    pixels = packed[:, :height * width * 3].view(b, -1, 3).gather(1, index)
    return (pixels.view(b, height, width, 3) * inside.unsqueeze(-1)).to(torch.uint8)


def canvas_to_float(canvas: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1]."""
    if canvas.dtype != torch.uint8 or canvas.ndim != 4 or canvas.shape[-1] != 3:
        raise ValueError("canvas must be uint8 [B, H, W, 3], got "
                         f"{canvas.dtype} {tuple(canvas.shape)}")
    return canvas.permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------- photometric ops
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W], torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def blend(x: torch.Tensor, target: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with a per-sample factor [N]; factor 1 returns x exactly."""
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * target).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, torch.zeros_like(x[:, :1]), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x), factor)


@functools.cache
def _hsv_offsets(device: torch.device) -> torch.Tensor:
    """[1, 3, 1, 1]: channel n of HSV -> RGB reads (offset_n + 6 h) mod 6; made once per device."""
    return torch.tensor([5.0, 3.0, 1.0], device=device).view(1, 3, 1, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by a per-sample factor [N] in [-0.5, 0.5] (HSV, as torchvision)."""
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    span = maxc - minc
    grey = span == 0  # hue and saturation undefined: leave 0, like torchvision
    sat = span / torch.where(grey, torch.ones_like(maxc), maxc)
    safe = torch.where(grey, torch.ones_like(span), span)
    r, g, b = x.unbind(dim=1)
    hue = torch.where(maxc == r, (g - b) / safe,
                      torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    hue = (hue / 6.0 + _per_sample(factor).squeeze(1)).remainder(1.0)
    # HSV -> RGB: channel n is v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6.
    k = (_hsv_offsets(x.device) + 6.0 * hue.unsqueeze(1)).remainder(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    v, s = maxc.unsqueeze(1), sat.unsqueeze(1)
    return v - v * s * ramp


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur, per-sample sigma [N], kernel 2*radius+1, reflect padding."""
    n, c, h, w = x.shape
    if radius >= min(h, w):
        raise ValueError(f"blur radius {radius} needs crops larger than {radius}, got {h}x{w}")
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)  # [N, 2r+1]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = x.reshape(1, n * c, h, w)  # one group per (sample, channel)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"),
                    kernel.view(n * c, 1, 1, -1).to(x.dtype), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"),
                    kernel.view(n * c, 1, -1, 1).to(x.dtype), groups=n * c)
    return flat.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


@dataclass
class AugParams:
    """Per-crop random parameters of one resolution group, all [N] tensors on the device."""

    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    factors: torch.Tensor  # [N, 4] brightness, contrast, saturation, hue
    order: torch.Tensor  # [N, 4] op index (0..3 as in `factors`) at each slot
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # blur sigma, pixels of the output crop
    solarize: torch.Tensor  # bool


def params_from_table(table: torch.Tensor) -> tuple[torch.Tensor, AugParams]:
    """A parameter table [N, NUM_P] (stage/draws.py) -> (boxes [N, 4] int64, AugParams)."""
    flag = table[:, D.P_FLIP:D.P_SOLARIZE + 1] != 0
    flip, jitter, gray, blur, sol = flag.unbind(dim=1)
    return table[:, D.P_TOP:D.P_WIDTH + 1].long(), AugParams(
        flip, jitter, table[:, D.P_FACTORS:D.P_FACTORS + 4],
        table[:, D.P_ORDER:D.P_ORDER + 4].long(), gray, blur, table[:, D.P_SIGMA], sol)


def draw_params(group: CropSpec, n: int, gen: torch.Generator,
                sizes: torch.Tensor | None = None) -> AugParams:
    """The photometric draws of n crops (sizes [B, 2] only matter for the boxes)."""
    u = D.draw_uniforms(n, gen)
    sizes = torch.full((n, 2), 256, device=u.device) if sizes is None else sizes
    return params_from_table(D.params_table(u, sizes.to(u.device), group))[1]


def color_jitter(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    """Brightness/contrast/saturation/hue in each sample's own order, where p.jitter."""
    hue_slot = (p.order == 3).to(torch.uint8).argmax(dim=1)  # [N]
    for before_hue in (True, False):
        for slot in range(4):
            op = p.order[:, slot]
            side = slot < hue_slot if before_hue else slot > hue_slot
            active = p.jitter & (op != 3) & side
            factor = p.factors.gather(1, op[:, None]).squeeze(1)
            factor = torch.where(active, factor, torch.ones_like(factor))
            gray = grayscale(x)
            target = torch.where(_per_sample(op == 0), torch.zeros_like(gray),
                                 torch.where(_per_sample(op == 1),
                                             gray.mean(dim=(1, 2, 3), keepdim=True), gray))
            x = blend(x, target, factor)
        if before_hue:
            x = torch.where(_per_sample(p.jitter), adjust_hue(x, p.factors[:, 3]), x)
    return x


def blur_radius(group: CropSpec) -> int:
    """torchvision's kernel radius for the group's largest sigma: 2 * radius + 1 taps."""
    return math.ceil(3 * group.blur_sigma[1])


def photometric(x: torch.Tensor, group: CropSpec, p: AugParams) -> torch.Tensor:
    """Jitter, grayscale, blur, solarize on [N, 3, S, S] floats in [0, 1] (flip is in the crop)."""
    x = color_jitter(x, p)
    x = torch.where(_per_sample(p.gray), grayscale(x).expand_as(x), x)
    if group.blur_p > 0:
        x = torch.where(_per_sample(p.blur), gaussian_blur(x, p.sigma, blur_radius(group)), x)
    if group.solarize_p > 0:
        x = torch.where(_per_sample(p.solarize),
                        solarize(x, group.solarize_threshold / 255.0), x)
    return x


def normalize(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    mean, std = mean_std(x.device)
    x = ((x - mean) / std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def val_resize_center_crop(canvas: torch.Tensor, sizes: torch.Tensor, resize: int,
                           crop: int) -> torch.Tensor:
    """torchvision Resize(resize) (bilinear, antialiased, shorter side) + CenterCrop(crop)
    on canvases -> float [B, 3, crop, crop] in [0, 1]."""
    images = canvas_to_float(canvas)
    hw = sizes.to(images.device, torch.float64)
    h, w = hw[:, 0], hw[:, 1]
    short = torch.minimum(h, w)
    # torchvision: the long side becomes int(resize * long / short)
    new_h = torch.where(h <= w, torch.full_like(h, resize), torch.floor(resize * h / short))
    new_w = torch.where(w < h, torch.full_like(w, resize), torch.floor(resize * w / short))
    top, left = torch.round((new_h - crop) / 2), torch.round((new_w - crop) / 2)
    zeros = torch.zeros_like(h)
    rows = resample_weights(zeros, h, new_h, top, crop, images.shape[2], "bilinear")
    cols = resample_weights(zeros, w, new_w, left, crop, images.shape[3], "bilinear")
    return resize_boxes(images, rows, cols)
