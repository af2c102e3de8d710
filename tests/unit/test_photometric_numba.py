"""pipelines/loaders/photometric_numba.py (DALI's CPU-mode photometric stage) against torchvision's
functional ops on float images (tests/helpers.torchvision_photometric), and its parameter draws.
Tolerance: max |diff| <= 1 of 255 (one rounding here, one there), solarize exact."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.loaders.photometric_numba import (
    D_BLUR,
    D_FACTORS,
    D_GRAY,
    D_JITTER,
    D_KEYS,
    D_SIGMA,
    D_SOLARIZE,
    NO_SOLARIZE,
    NUM_DRAWS,
    P_FACTORS,
    P_GRAY,
    P_JITTER,
    P_KEYS,
    P_SIGMA,
    P_THRESHOLD,
    make_params,
    order_of,
    params_from,
    photometric,
    spec_vector,
)
from pipelines.spec import CropSpec
from tests.helpers import torchvision_photometric


def ours(image: np.ndarray, **kw) -> np.ndarray:
    out = np.empty_like(image)
    photometric(out, image, make_params(**kw))
    return out.astype(np.float64)


def images(rng) -> list[np.ndarray]:
    """Noise, a smooth saturated gradient, and grey and black/white patches (hue undefined,
    clamping at both ends)."""
    noise = rng.integers(0, 256, (37, 41, 3), dtype=np.uint8)
    h, w = np.meshgrid(np.linspace(0, 1, 48), np.linspace(0, 1, 32), indexing="xy")
    smooth = (np.stack([h, w, 1 - h], -1) * 255).astype(np.uint8)
    patches = np.full((16, 24, 3), 128, np.uint8)
    patches[:, :8], patches[:, 16:] = 0, 255
    return [noise, smooth, patches]


def assert_close(image: np.ndarray, tol: float = 1, **kw) -> None:
    diff = np.abs(ours(image, **kw) - torchvision_photometric(image, **kw))
    assert diff.max() <= tol, (kw, diff.max())


def test_jitter_matches_torchvision_in_every_order_and_range():
    rng = np.random.default_rng(0)
    for _ in range(40):
        jitter = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2),
                  rng.uniform(-0.5, 0.5)]
        keys = rng.permutation(4).astype(np.float32)
        for image in images(rng):
            assert_close(image, jitter=jitter, keys=keys)


def test_the_jitter_order_is_the_keys_order():
    """Strong factors where the order changes the result: ours follows the keys."""
    image = images(np.random.default_rng(1))[1]
    jitter, forward, backward = [1.4, 0.6, 1.2, 0.1], [0, 1, 2, 3], [3, 2, 1, 0]
    assert_close(image, jitter=jitter, keys=forward)
    assert_close(image, jitter=jitter, keys=backward)
    a, b = ours(image, jitter=jitter, keys=forward), ours(image, jitter=jitter, keys=backward)
    assert np.abs(a - b).mean() > 5  # the two orders really differ on this image


@pytest.mark.parametrize("keys,order", [([0.5, 0.5, 0.1, 0.5], [2, 0, 1, 3]),
                                        ([0.9, 0.2, 0.2, 0.0], [3, 1, 2, 0])])
def test_ties_are_broken_by_index(keys, order):
    assert order_of(np.float32(keys)).tolist() == order


def test_grayscale_blur_solarize_and_the_whole_chain_match_torchvision():
    rng = np.random.default_rng(2)
    for image in images(rng):
        assert np.array_equal(ours(image), image)  # nothing flagged: unchanged
        assert_close(image, jitter=[1.0, 1.0, 1.0, 0.0])  # identity factors
        assert_close(image, gray=True)
        grey = ours(image, gray=True)
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        for sigma in (0.1, 0.7, 2.0):
            assert_close(image, blur_sigma=sigma)
        assert_close(image, tol=0, solarize_threshold=128)
        assert_close(image, jitter=[1.3, 0.7, 1.1, -0.08], keys=[2, 0, 3, 1], gray=True,
                     blur_sigma=1.3, solarize_threshold=128)


def test_blur_borders_mirror_without_repeating_the_edge():
    """A lone bright pixel on the border: its mirror image is itself, so the blurred
    column is symmetric about the edge pixel and matches torchvision's "reflect"."""
    image = np.zeros((9, 9, 3), np.uint8)
    image[4, 0] = 255
    blurred = ours(image, blur_sigma=1.0)
    assert blurred[4, 1, 0] > 0 and np.array_equal(blurred[:, 1], blurred[::-1, 1])
    assert_close(image, blur_sigma=1.0)


SPEC = CropSpec(1, 32, (0.2, 1.0), blur_p=0.5, solarize_p=0.2)


def _draws(at: dict[int, float]) -> np.ndarray:
    """NUM_DRAWS uniforms, 0.5 except those given (draw index -> value)."""
    d = np.full(NUM_DRAWS, 0.5, np.float32)
    for index, value in at.items():
        d[index] = value
    return d


def test_params_from_draws_maps_coins_and_ranges_as_colorjitter():
    spec = spec_vector(SPEC)
    low = params_from(_draws({D_JITTER: 0.0, D_KEYS: 0.25, D_GRAY: 0.1, D_BLUR: 0.0,
                              D_SIGMA: 0.0, D_SOLARIZE: 0.0}), spec)
    assert low[P_JITTER] == 1 and low[P_GRAY] == 1 and low[P_THRESHOLD] == 128
    assert np.allclose(low[P_SIGMA], 0.1)
    assert np.allclose(low[P_KEYS:P_KEYS + 4], [0.25, 0.5, 0.5, 0.5])
    zero = _draws({D_JITTER: 0.0})
    zero[D_FACTORS:D_FACTORS + 4] = 0.0
    assert np.allclose(params_from(zero, spec)[P_FACTORS:P_FACTORS + 4],
                       [0.6, 0.6, 0.8, -0.1])
    one = _draws({D_JITTER: 0.0})
    one[D_FACTORS:D_FACTORS + 4] = 1.0
    assert np.allclose(params_from(one, spec)[P_FACTORS:P_FACTORS + 4], [1.4, 1.4, 1.2, 0.1])
    high = params_from(_draws({D_JITTER: 0.81, D_GRAY: 0.2, D_BLUR: 0.5, D_SIGMA: 0.999,
                               D_SOLARIZE: 0.2}), spec)
    assert high[P_JITTER] == 0 and high[P_GRAY] == 0 and high[P_SIGMA] == 0
    assert high[P_THRESHOLD] == NO_SOLARIZE
    assert np.allclose(params_from(_draws({D_BLUR: 0.49, D_SIGMA: 0.999}), spec)[P_SIGMA], 2.0,
                       atol=1e-2)


def test_params_from_uniform_draws_have_the_spec_rates():
    """10,000 draws: each coin's rate within 4.5 binomial standard errors of its p."""
    rng = np.random.default_rng(3)
    spec = spec_vector(SPEC)
    params = np.stack([params_from(rng.random(NUM_DRAWS, dtype=np.float32), spec)
                       for _ in range(10_000)])
    for rate, p in ((params[:, P_JITTER].mean(), 0.8), (params[:, P_GRAY].mean(), 0.2),
                    ((params[:, P_SIGMA] > 0).mean(), 0.5),
                    ((params[:, P_THRESHOLD] < NO_SOLARIZE).mean(), 0.2)):
        assert abs(rate - p) < 4.5 * np.sqrt(p * (1 - p) / len(params)), (rate, p)
    jittered = params[params[:, P_JITTER] == 1]
    assert jittered[:, P_FACTORS].min() >= 0.6 and jittered[:, P_FACTORS].max() <= 1.4
    assert abs(jittered[:, P_FACTORS + 3].mean()) < 0.005  # hue centred on 0
