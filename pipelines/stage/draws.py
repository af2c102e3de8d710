"""The random draws of the device multi-crop stage: one uniform tensor, one parameter table.

Every random choice of a batch comes from ONE `torch.rand` call on the device: a [N, NUM_U]
float32 tensor of uniforms in [0, 1), one row per crop (crop-major, globals first:
[global B | local_1 B | ... | local_L B]). `params_table` (plain torch, the spec) turns the
rows of one crop group into a [n, NUM_P] float32 table of that group's parameters;
pipelines/stage/triton_multicrop.py's parameter kernel computes the same table on the GPU in one
launch. Both implementations of the stage read the table, so they make the same draws for the
same generator state.

The mapping, column by column, is torchvision's:
- RandomResizedCrop.get_params: 10 tries of (area fraction ~ U(scale), log aspect ~
  U(log ratio), top, left); the first try that fits wins, else the central fallback. Box
  arithmetic in float64 (round half to even, as Python's round), so it is exact in integers.
- flip / jitter / grayscale / blur / solarize coins: u < p.
- ColorJitter.get_params: factors ~ U(max(0, 1 - x), 1 + x) (hue U(-h, h)); the order is the
  argsort of 4 uniform keys (a uniformly random permutation, as torch.randperm(4)).
- blur sigma ~ U(sigma_min, sigma_max).
"""
from __future__ import annotations

import math

import torch

from pipelines.batch import derived_seed
from pipelines.spec import CropSpec

RRC_TRIES = 10  # torchvision RandomResizedCrop.get_params

# Columns of the uniforms, per crop.
U_AREA = 0  # RRC_TRIES columns each
U_LOG_RATIO = U_AREA + RRC_TRIES
U_TOP = U_LOG_RATIO + RRC_TRIES
U_LEFT = U_TOP + RRC_TRIES
U_FLIP = U_LEFT + RRC_TRIES
U_JITTER = U_FLIP + 1
U_FACTORS = U_JITTER + 1  # 4: brightness, contrast, saturation, hue
U_ORDER = U_FACTORS + 4  # 4 keys
U_GRAY = U_ORDER + 4
U_BLUR = U_GRAY + 1
U_SIGMA = U_BLUR + 1
U_SOLARIZE = U_SIGMA + 1
NUM_U = U_SOLARIZE + 1

# Columns of the parameter table, per crop (float32; boxes and flags hold whole numbers).
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH = range(4)  # crop box in the source image, pixels
P_FLIP, P_JITTER, P_GRAY, P_BLUR, P_SOLARIZE = range(4, 9)  # 0 or 1
P_FACTORS = 9  # 4: brightness, contrast, saturation factors and the hue shift
P_ORDER = 13  # 4: the jitter op (0..3, as in the factors) applied at each of the 4 slots
P_SIGMA = 17  # blur sigma, pixels of the output crop
NUM_P = 18
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def make_generator(device: torch.device, seed: int, rank: int, epoch: int,
                   step: int) -> torch.Generator:
    """A generator on `device` that depends on (seed, rank, epoch, step) only: every rank draws
    its own augmentations (under DDP rank r's image b is another image than rank 0's)."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, rank, epoch, step))


def draw_uniforms(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, NUM_U] float32 uniforms on the generator's device: the batch's only random op."""
    return torch.rand(n, NUM_U, generator=gen, device=gen.device)


def jitter_bounds(group: CropSpec) -> tuple[tuple[float, float], ...]:
    """ColorJitter's ranges of the 4 factors (brightness, contrast, saturation, hue)."""
    return ((max(0.0, 1 - group.brightness), 1 + group.brightness),
            (max(0.0, 1 - group.contrast), 1 + group.contrast),
            (max(0.0, 1 - group.saturation), 1 + group.saturation),
            (-group.hue, group.hue))


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Python's round() on float64 tensors, written out as the kernel does it."""
    r = torch.floor(x + 0.5)
    tie_to_odd = (r - x == 0.5) & (r - 2 * torch.floor(r / 2) == 1)
    return torch.where(tie_to_odd, r - 1, r)


def boxes_from_uniforms(u: torch.Tensor, sizes: torch.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> torch.Tensor:
    """RandomResizedCrop boxes: u [n, NUM_U] (only the RRC columns are read), sizes [n, 2]
    (height, width of each crop's image) -> [n, 4] float64 (top, left, height, width)."""
    height = sizes[:, :1].to(torch.float64)  # [n, 1]
    width = sizes[:, 1:].to(torch.float64)
    tries = u[:, :4 * RRC_TRIES].to(torch.float64).view(-1, 4, RRC_TRIES)  # [n, 4, 10]
    area = height * width * (scale[0] + (scale[1] - scale[0]) * tries[:, 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * tries[:, 1])
    w = round_half_even(torch.sqrt(area * aspect))  # [n, 10]
    h = round_half_even(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(tries[:, 2] * (height - h + 1))  # randint(0, height - h + 1)
    left = torch.floor(tries[:, 3] * (width - w + 1))
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first try that fits
    chosen = [t.gather(1, first).squeeze(1) for t in (top, left, h, w)]

    height, width = height.squeeze(1), width.squeeze(1)
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fb_w = torch.where(wide, round_half_even(height * max(ratio)), width)
    fb_h = torch.where(narrow, round_half_even(width / min(ratio)), height)
    fallback = [torch.floor((height - fb_h) / 2), torch.floor((width - fb_w) / 2), fb_h, fb_w]
    any_fit = fits.any(dim=1)
    return torch.stack([torch.where(any_fit, c, f) for c, f in zip(chosen, fallback)], dim=1)


def params_table(u: torch.Tensor, sizes: torch.Tensor, group: CropSpec) -> torch.Tensor:
    """The spec of the parameter kernel: u [count*B, NUM_U] (this group's rows), sizes [B, 2]
    -> [count*B, NUM_P] float32. Row k*B + b is crop k of image b."""
    n, b = u.shape[0], sizes.shape[0]
    image_sizes = sizes.repeat(n // b, 1)  # [n, 2], crop-major
    table = torch.empty(n, NUM_P, dtype=torch.float32, device=u.device)
    table[:, P_TOP:P_WIDTH + 1] = boxes_from_uniforms(u, image_sizes, group.scale, group.ratio)
    for col, ucol, p in ((P_FLIP, U_FLIP, group.flip_p), (P_JITTER, U_JITTER, group.jitter_p),
                         (P_GRAY, U_GRAY, group.grayscale_p), (P_BLUR, U_BLUR, group.blur_p),
                         (P_SOLARIZE, U_SOLARIZE, group.solarize_p)):
        table[:, col] = (u[:, ucol] < p).float()
    for k, (lo, hi) in enumerate(jitter_bounds(group)):
        table[:, P_FACTORS + k] = lo + (hi - lo) * u[:, U_FACTORS + k]
    # stable argsort: ties (probability ~0) broken by op index, as the kernel's rank count
    table[:, P_ORDER:P_ORDER + 4] = u[:, U_ORDER:U_ORDER + 4].argsort(dim=1, stable=True).float()
    lo, hi = group.blur_sigma
    table[:, P_SIGMA] = lo + (hi - lo) * u[:, U_SIGMA]
    return table
