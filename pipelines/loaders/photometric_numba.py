"""The recipe's photometric augmentations of one crop in one compiled call: ColorJitter (its four
ops in the sample's random order), grayscale, Gaussian blur, solarize, each applied or skipped by
a per-sample flag. DALI's CPU mode runs it through numba_function
(pipelines/loaders/dali_multicrop.py): one operator per crop instead of ~20 DALI operators
and four conditionals.

Semantics are torchvision's on float images, kept in 0..255 floats (every op is
scale-equivariant) and rounded once, before solarize (which compares the uint8 value):
- jitter: brightness / contrast / saturation blend with black / the mean luma / the pixel's luma
  and clamp; hue shifts H of HSV by `hue` turns. Op k runs at the rank of keys[k] (ties by k),
  so uniform keys give a uniform random order like torch.randperm(4).
- grayscale: luma (0.2989, 0.587, 0.114) in all three channels.
- blur: Gaussian of `sigma` px, window 2 * ceil(3 * sigma) + 1 (DALI's default), borders
  mirrored without repeating the edge (torch's "reflect").
- solarize: v >= threshold -> 255 - v.

`params` per sample, float32, laid out by the P_* indices below: the jitter flag (0 or 1), its
factors [b, c, s, hue in turns] and order keys, the grayscale flag, the blur sigma (0: no blur)
and the solarize threshold (NO_SOLARIZE or above: none). `augment` derives them from NUM_DRAWS
uniform numbers and a crop group's spec_vector, so DALI needs one random op per crop.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter op k: factor P_FACTORS + k
P_JITTER, P_FACTORS, P_KEYS, P_GRAY, P_SIGMA, P_THRESHOLD = 0, 1, 5, 9, 10, 11
NUM_PARAMS = 12
NO_SOLARIZE = 256.0  # a threshold no uint8 value reaches
# spec_vector layout: a crop group's probabilities and ranges
(S_JITTER_P, S_BRIGHTNESS, S_CONTRAST, S_SATURATION, S_HUE, S_GRAY_P, S_BLUR_P, S_SIGMA_LOW,
 S_SIGMA_HIGH, S_SOLARIZE_P, S_THRESHOLD) = range(11)
# uniform draws: coins for jitter, grayscale, blur and solarize; 4 factors; 4 keys; sigma
D_JITTER, D_FACTORS, D_KEYS, D_GRAY, D_BLUR, D_SIGMA, D_SOLARIZE = 0, 1, 5, 9, 10, 11, 12
NUM_DRAWS = 13
LUMA_R, LUMA_G, LUMA_B = 0.2989, 0.587, 0.114  # torchvision's rgb_to_grayscale weights


@njit(cache=True)
def _order(keys):
    """Jitter op indices in the order they run: ascending keys, ties by index (stable sort)."""
    return np.argsort(keys, kind="mergesort")


def order_of(keys) -> np.ndarray:
    """_order for any sequence of 4 keys (the convention the tests build references with)."""
    return _order(np.asarray(keys, np.float32))


def make_params(jitter=None, keys=(0, 1, 2, 3), gray=False, blur_sigma=None,
                solarize_threshold=None) -> np.ndarray:
    """A params vector (for tests and callers outside DALI): jitter = [b, c, s, h] or None."""
    p = np.zeros(NUM_PARAMS, np.float32)
    if jitter is not None:
        p[P_JITTER], p[P_FACTORS:P_FACTORS + 4], p[P_KEYS:P_KEYS + 4] = 1, jitter, keys
    p[P_GRAY] = gray
    p[P_SIGMA] = blur_sigma or 0.0
    p[P_THRESHOLD] = NO_SOLARIZE if solarize_threshold is None else solarize_threshold
    return p


def spec_vector(group) -> np.ndarray:
    """A pipelines.spec.CropSpec's photometric probabilities and ranges, in the S_* layout."""
    return np.array([group.jitter_p, group.brightness, group.contrast, group.saturation,
                     group.hue, group.grayscale_p, group.blur_p, *group.blur_sigma,
                     group.solarize_p, group.solarize_threshold], np.float32)


@njit(cache=True)
def params_from(draws, spec):
    """params (P_* layout) from NUM_DRAWS uniforms in [0, 1) and a spec_vector: a coin is
    draw < p; a factor x +- w is x - w + 2 w * draw, as ColorJitter.get_params draws it."""
    p = np.zeros(NUM_PARAMS, np.float32)
    if draws[D_JITTER] < spec[S_JITTER_P]:
        p[P_JITTER] = 1.0
        for k in range(3):  # brightness, contrast, saturation around 1; hue around 0
            p[P_FACTORS + k] = 1.0 + spec[S_BRIGHTNESS + k] * (2.0 * draws[D_FACTORS + k] - 1.0)
        p[P_FACTORS + HUE] = spec[S_HUE] * (2.0 * draws[D_FACTORS + HUE] - 1.0)
        p[P_KEYS:P_KEYS + 4] = draws[D_KEYS:D_KEYS + 4]
    p[P_GRAY] = 1.0 if draws[D_GRAY] < spec[S_GRAY_P] else 0.0
    if draws[D_BLUR] < spec[S_BLUR_P]:
        low, high = spec[S_SIGMA_LOW], spec[S_SIGMA_HIGH]
        p[P_SIGMA] = low + (high - low) * draws[D_SIGMA]
    p[P_THRESHOLD] = spec[S_THRESHOLD] if draws[D_SOLARIZE] < spec[S_SOLARIZE_P] else NO_SOLARIZE
    return p


# ---------------------------------------------------------------- per pixel
@njit(cache=True, inline="always")
def _clamp(v):
    return min(max(v, 0.0), 255.0)


@njit(cache=True, inline="always")
def _luma(r, g, b):
    return LUMA_R * r + LUMA_G * g + LUMA_B * b


@njit(cache=True, inline="always")
def _wrap6(k):
    """k mod 6 for k in [-6, 12) (selects, no division: this runs per pixel)."""
    k = k + 6.0 if k < 0.0 else k
    return k - 6.0 if k >= 6.0 else k


@njit(cache=True, inline="always")
def _hsv_channel(value, chroma, k):
    """One channel of HSV -> RGB: V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6 with
    n = 5, 3, 1 for R, G, B and H in sixths of a turn (torchvision's six sectors, unrolled)."""
    return value - chroma * min(max(min(k, 4.0 - k), 0.0), 1.0)


@njit(cache=True, inline="always")
def _shift_hue(r, g, b, shift):
    """torchvision's _rgb2hsv, H += shift (mod 1), _hsv2rgb on one pixel (V = max and
    C = max - min are kept; S = C / V is never needed)."""
    maxc = max(r, g, b)
    chroma = maxc - min(r, g, b)
    if chroma == 0.0:  # grey: hue undefined, the pixel is unchanged (torchvision: s = 0)
        return r, g, b
    if maxc == r:  # torchvision's tie order: R, then G, then B
        h6 = (g - b) / chroma
    elif maxc == g:
        h6 = 2.0 + (b - r) / chroma
    else:
        h6 = 4.0 + (r - g) / chroma
    h6 = _wrap6(h6 + 6.0 * shift)  # |6 * shift| <= 3 (hue <= 0.5): inside _wrap6's range
    return (_hsv_channel(maxc, chroma, _wrap6(h6 + 5.0)),
            _hsv_channel(maxc, chroma, _wrap6(h6 + 3.0)),
            _hsv_channel(maxc, chroma, _wrap6(h6 + 1.0)))


@njit(cache=True, inline="always")
def _pixel_ops(r, g, b, ops, factors):
    """The pixel-local jitter ops (brightness, saturation, hue) in the order of `ops`."""
    for op in ops:
        f = factors[op]
        if op == BRIGHTNESS:
            r, g, b = _clamp(f * r), _clamp(f * g), _clamp(f * b)
        elif op == SATURATION:
            grey = (1.0 - f) * _luma(r, g, b)
            r, g, b = _clamp(f * r + grey), _clamp(f * g + grey), _clamp(f * b + grey)
        else:
            r, g, b = _shift_hue(r, g, b, f)
    return r, g, b


# ---------------------------------------------------------------- per image
@njit(cache=True)
def _jitter(x, factors, keys):
    """ColorJitter in place on x (HWC float32, 0..255). Contrast blends with the mean luma of
    the image as the ops before it left it: pass 1 applies those and sums the luma, pass 2
    applies contrast and the ops after it."""
    order = _order(keys)
    split = np.nonzero(order == CONTRAST)[0][0]
    before, after = order[:split], order[split + 1:]
    total = 0.0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            r, g, b = _pixel_ops(x[i, j, 0], x[i, j, 1], x[i, j, 2], before, factors)
            x[i, j, 0], x[i, j, 1], x[i, j, 2] = r, g, b
            total += _luma(r, g, b)
    c = factors[CONTRAST]
    grey = (1.0 - c) * total / (x.shape[0] * x.shape[1])
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            x[i, j, 0], x[i, j, 1], x[i, j, 2] = _pixel_ops(
                _clamp(c * x[i, j, 0] + grey), _clamp(c * x[i, j, 1] + grey),
                _clamp(c * x[i, j, 2] + grey), after, factors)


@njit(cache=True)
def _grayscale(x):
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = _luma(x[i, j, 0], x[i, j, 1], x[i, j, 2])
            x[i, j, 0], x[i, j, 1], x[i, j, 2] = v, v, v


@njit(cache=True)
def _mirror(p, n):
    """Index p folded into [0, n) without repeating the edge (... 2 1 | 0 1 2 ... n-1 | n-2 ...)."""
    if n == 1:
        return 0
    while p < 0 or p >= n:
        p = -p if p < 0 else 2 * n - 2 - p
    return p


@njit(cache=True)
def _blur_axis(src, dst, weights, axis):
    """dst = src convolved with `weights` (odd length, centred) along axis 0 or 1."""
    radius = len(weights) // 2
    n = src.shape[axis]
    taps = np.empty((n, len(weights)), np.int64)  # mirrored source index of each tap
    for p in range(n):
        for t in range(len(weights)):
            taps[p, t] = _mirror(p + t - radius, n)
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            r = g = b = 0.0
            for t in range(len(weights)):
                w = weights[t]
                si, sj = (taps[i, t], j) if axis == 0 else (i, taps[j, t])
                r += w * src[si, sj, 0]
                g += w * src[si, sj, 1]
                b += w * src[si, sj, 2]
            dst[i, j, 0], dst[i, j, 1], dst[i, j, 2] = r, g, b


@njit(cache=True)
def _blur(x, sigma):
    radius = int(math.ceil(3.0 * sigma))
    weights = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2.0 * sigma * sigma))
    weights = (weights / weights.sum()).astype(np.float32)
    tmp = np.empty_like(x)
    _blur_axis(x, tmp, weights, 1)
    _blur_axis(tmp, x, weights, 0)


@njit(cache=True)
def photometric(out, image, params):
    """out (HWC uint8) <- the flagged ops of `params` applied to image (HWC uint8), in the
    recipe's order: jitter, grayscale, blur, solarize."""
    x = image.astype(np.float32)
    if params[P_JITTER] > 0.5:
        _jitter(x, params[P_FACTORS:P_FACTORS + 4], params[P_KEYS:P_KEYS + 4])
    if params[P_GRAY] > 0.5:
        _grayscale(x)
    if params[P_SIGMA] > 0.0:
        _blur(x, params[P_SIGMA])
    threshold = params[P_THRESHOLD]
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            for c in range(3):
                v = np.floor(x[i, j, c] + 0.5)
                out[i, j, c] = np.uint8(255.0 - v if v >= threshold else v)


@njit(cache=True)
def augment(out, image, draws, spec):
    """photometric() with params drawn from `draws` for a crop group's `spec` (params_from)."""
    photometric(out, image, params_from(draws, spec))
