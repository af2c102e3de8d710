"""Faithfulness of pipelines/stage/torch_spec.py to torchvision and to
pipelines/loaders/reference.py.

Tolerances (also in docs/PIPELINES.md):
- crop + resize of a fixed box vs torchvision's antialiased bicubic tensor resize: 1e-4 on
  [0, 1]; vs the reference's PIL crop+resize on a real JPEG: mean |diff| < 0.5 of 255.
- each colour op vs torchvision.transforms.v2.functional with the same parameters: 1e-5.
- box distributions vs RandomResizedCrop.get_params: deciles of the area fraction within 0.02,
  of log aspect ratio within 0.03, fallback rate within 0.01 (20k draws each).
- augmentation rates: within 4.5 binomial standard errors of the spec's probability.
- per-channel mean/std of the normalised output vs the reference on the same images: within
  4 standard errors + 0.02 (768 global, 6144 local crops each; a global channel mean's standard
  error is ~0.05 there, so no absolute cap below that is meaningful).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipelines import demo_data
from pipelines.loaders.reference import MultiCropDataset, load_rgb, val_transform
from pipelines.spec import CropSpec, MultiCropSpec, val_resize_size
from pipelines.stage import torch_spec as G
from pipelines.stage.dispatch import GpuMultiCrop

SPEC = MultiCropSpec(CropSpec(1, 64, (0.25, 1.0), blur_p=0.2, solarize_p=0.2),
                     CropSpec(8, 32, (0.05, 0.25), blur_p=0.5, solarize_p=0.0))


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo_data.write_dataset(str(root), train_per_class=4, val_per_class=2)
    return root


def _canvas(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """HWC uint8 arrays -> top-left-packed canvas [B, Hmax, Wmax, 3] and sizes [B, 2]."""
    hmax = max(a.shape[0] for a in images)
    wmax = max(a.shape[1] for a in images)
    canvas = torch.zeros(len(images), hmax, wmax, 3, dtype=torch.uint8)
    for i, a in enumerate(images):
        canvas[i, :a.shape[0], :a.shape[1]] = torch.from_numpy(a.copy())
    sizes = torch.tensor([a.shape[:2] for a in images])
    return canvas, sizes


def _train_images(root, n: int) -> tuple[list[str], list[np.ndarray]]:
    paths = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))[:n]
    return paths, [np.asarray(load_rgb(p)) for p in paths]


# ---------------------------------------------------------------- boxes
@pytest.mark.parametrize("hw", [(375, 500), (500, 333), (120, 150)])
def test_box_distribution_matches_torchvision(hw):
    h, w = hw
    n = 20000
    for scale in ((0.25, 1.0), (0.05, 0.25)):
        gen = torch.Generator().manual_seed(1)
        ours = G.sample_boxes(torch.tensor([[h, w]]), n, scale, (3 / 4, 4 / 3), gen).double()
        assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
        assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
        torch.manual_seed(2)
        dummy = torch.empty(1, h, w)
        theirs = torch.tensor([T.RandomResizedCrop.get_params(dummy, list(scale), [3 / 4, 4 / 3])
                               for _ in range(n)], dtype=torch.float64)
        q = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
        for stat, tol in ((lambda b: b[:, 2] * b[:, 3] / (h * w), 0.02),
                          (lambda b: torch.log(b[:, 3] / b[:, 2]), 0.03)):
            diff = (torch.quantile(stat(ours), q) - torch.quantile(stat(theirs), q)).abs().max()
            assert diff < tol, (hw, scale, diff)


def test_box_fallback_is_torchvisions_central_crop():
    # 10 x 1000: no try fits (height >= 43 needed), so every crop is the central fallback.
    gen = torch.Generator().manual_seed(0)
    boxes = G.sample_boxes(torch.tensor([[10, 1000], [1000, 10]]), 3, (0.25, 1.0),
                           (3 / 4, 4 / 3), gen)
    for b, (h, w) in zip(boxes.tolist(), [(10, 1000), (1000, 10)] * 3):
        expected = T.RandomResizedCrop.get_params(torch.empty(1, h, w), [0.25, 1.0],
                                                  [3 / 4, 4 / 3])
        assert tuple(b) == tuple(expected)


def test_sample_boxes_rejects_bad_sizes():
    with pytest.raises(ValueError, match="sizes must be"):
        G.sample_boxes(torch.tensor([10, 20]), 1, (0.2, 1.0), (0.75, 1.33),
                       torch.Generator())


# ---------------------------------------------------------------- crop + resize
def test_crop_resize_matches_torchvision_antialiased_resize():
    torch.manual_seed(0)
    img = torch.rand(3, 3, 120, 150).mul(255).round().div(255)
    canvas = img.mul(255).round().byte().permute(0, 2, 3, 1).contiguous()
    boxes = torch.tensor([[10, 20, 70, 90], [0, 0, 120, 150], [50, 60, 20, 15]])
    for size in (64, 32):  # downscale and upscale
        out = G.crop_resize(G.canvas_to_float(canvas), boxes, size)
        flipped = G.crop_resize(G.canvas_to_float(canvas), boxes, size,
                                flip=torch.tensor([True, False, True]))
        for i, (t, left, h, w) in enumerate(boxes.tolist()):
            ref = TF.resize(img[i, :, t:t + h, left:left + w], [size, size],
                            interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            ref = ref.clamp(0, 1)
            assert (out[i] - ref).abs().max() < 1e-4
            want = ref.flip(-1) if i != 1 else ref
            assert (flipped[i] - want).abs().max() < 1e-4


def test_crop_resize_close_to_pil_on_real_jpeg(jpeg_root):
    _, images = _train_images(jpeg_root, 2)
    canvas, _ = _canvas(images)
    boxes = torch.tensor([[5, 7, 60, 80], [0, 0, 84, 112]])
    out = G.crop_resize(G.canvas_to_float(canvas), boxes, 48) * 255
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        pil = Image.fromarray(images[i]).crop((left, t, left + w, t + h))
        pil = np.asarray(pil.resize((48, 48), Image.BICUBIC), dtype=np.float32)
        diff = (out[i].permute(1, 2, 0) - torch.from_numpy(pil)).abs()
        assert diff.mean() < 0.5 and diff.max() < 8, (diff.mean(), diff.max())


def test_val_resize_center_crop_matches_reference(jpeg_root):
    paths = sorted(str(p) for p in (jpeg_root / "val").rglob("*.JPEG"))[:4]
    pils = [load_rgb(p) for p in paths]
    canvas, sizes = _canvas([np.asarray(p) for p in pils])
    ours = G.val_resize_center_crop(canvas, sizes, val_resize_size(64), 64) * 255
    ref = torch.stack([val_transform(64)(p) for p in pils]).float()
    diff = (ours - ref).abs()
    assert diff.mean() < 0.5 and diff.max() < 6, (diff.mean(), diff.max())


# ---------------------------------------------------------------- colour ops
def test_colour_ops_match_torchvision_functional():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 24, 20)
    f = torch.tensor([0.6, 1.0, 1.4, 0.85, 1.2])
    hue = torch.tensor([-0.1, 0.05, 0.0, 0.1, -0.03])
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 1.5])
    cases = [(G.adjust_brightness(x, f), lambda i: TF.adjust_brightness(x[i], f[i].item())),
             (G.adjust_contrast(x, f), lambda i: TF.adjust_contrast(x[i], f[i].item())),
             (G.adjust_saturation(x, f), lambda i: TF.adjust_saturation(x[i], f[i].item())),
             (G.adjust_hue(x, hue), lambda i: TF.adjust_hue(x[i], hue[i].item())),
             (G.gaussian_blur(x, sigma, 6),
              lambda i: TF.gaussian_blur(x[i], [13, 13], [sigma[i].item()] * 2)),
             (G.grayscale(x).expand_as(x), lambda i: TF.rgb_to_grayscale(x[i], 3)),
             (G.solarize(x, 128 / 255), lambda i: TF.solarize(x[i], 128 / 255))]
    for k, (ours, theirs) in enumerate(cases):
        for i in range(5):
            assert (ours[i] - theirs(i)).abs().max() < 1e-5, (k, i)


def test_colour_jitter_applies_each_samples_order():
    torch.manual_seed(3)
    n = 24
    x = torch.rand(n, 3, 16, 16)
    params = G.draw_params(SPEC.global_group, n, torch.Generator().manual_seed(5))
    assert len({tuple(o) for o in params.order.tolist()}) > 6  # many distinct orders
    ours = G.color_jitter(x, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        want = x[i]
        if params.jitter[i]:
            for op in params.order[i].tolist():
                want = ops[op](want, params.factors[i, op].item())
        assert (ours[i] - want).abs().max() < 1e-5, i


def test_augmentation_rates_match_spec():
    for group in SPEC.groups:
        n = 40000
        p = G.draw_params(group, n, torch.Generator().manual_seed(7))
        for name, rate in (("flip", group.flip_p), ("jitter", group.jitter_p),
                           ("gray", group.grayscale_p), ("blur", group.blur_p),
                           ("solarize", group.solarize_p)):
            got = getattr(p, name).float().mean().item()
            se = math.sqrt(max(rate * (1 - rate), 1e-12) / n)
            assert abs(got - rate) <= 4.5 * se + 1e-9, (name, got, rate)
        lo, hi = p.factors.min(0).values, p.factors.max(0).values
        assert lo[0] >= 0.6 and hi[0] <= 1.4 and lo[2] >= 0.8 and hi[3] <= 0.1
        assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0


# ---------------------------------------------------------------- the whole stage
def test_stage_shapes_determinism_and_layout(jpeg_root):
    _, images = _train_images(jpeg_root, 6)
    canvas, sizes = _canvas(images)
    labels = torch.arange(6)
    stage = GpuMultiCrop(SPEC, torch.device("cpu"), torch.bfloat16, True, seed=11)
    a = stage(canvas, sizes, labels, epoch=2, step=5)
    b = stage(canvas, sizes, labels, epoch=2, step=5)
    c = stage(canvas, sizes, labels, epoch=2, step=6)
    assert a.global_crops.shape == (6, 3, 64, 64) and a.local_crops.shape == (48, 3, 32, 32)
    assert a.global_crops.dtype == torch.bfloat16
    assert a.local_crops.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.global_crops, b.global_crops)
    assert torch.equal(a.local_crops, b.local_crops)
    assert not torch.equal(a.local_crops, c.local_crops)
    assert torch.isfinite(a.local_crops.float()).all() and torch.equal(a.labels, labels)


REPEATS = 24


def test_output_statistics_match_reference(jpeg_root):
    """Per-channel mean/std of the normalised crops, ours vs reference, same 32 images."""
    _, images = _train_images(jpeg_root, 32)
    canvas, sizes = _canvas(images)
    stage = GpuMultiCrop(SPEC, torch.device("cpu"), torch.float32, False, seed=0)
    ours = [[], []]
    for step in range(REPEATS):
        batch = stage(canvas, sizes, torch.zeros(32), epoch=0, step=step)
        ours[0].append(batch.global_crops)
        ours[1].append(batch.local_crops)
    ds = MultiCropDataset(str(jpeg_root / "train"), SPEC, seed=0)
    index = {p: i for i, (p, _) in enumerate(ds.folder.samples)}
    paths, _ = _train_images(jpeg_root, 32)
    mean = torch.tensor(G.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(G.IMAGENET_STD).view(1, 3, 1, 1) * 255
    ref = [[], []]
    for epoch in range(REPEATS):
        for p in paths:
            g, loc, _ = ds[(epoch, index[p])]
            ref[0].append((torch.stack(g).float() - mean) / std)
            ref[1].append((torch.stack(loc).float() - mean) / std)
    for k in range(2):
        a, b = torch.cat(ours[k]), torch.cat(ref[k])  # [crops, 3, S, S]
        for stat in (lambda t: t.mean(dim=(2, 3)), lambda t: t.std(dim=(2, 3))):
            sa, sb = stat(a), stat(b)  # per crop and channel: [crops, 3]
            # crops are the random unit: compare channel averages within 4 standard errors
            # of the difference plus a 0.02 bias allowance (PIL uint8 vs float maths)
            se = (sa.var(0) / len(sa) + sb.var(0) / len(sb)).sqrt()
            diff = (sa.mean(0) - sb.mean(0)).abs()
            assert (diff < 4 * se + 0.02).all(), (k, diff, se)


def test_canvas_must_be_uint8_hwc():
    with pytest.raises(ValueError, match="canvas must be uint8"):
        G.canvas_to_float(torch.zeros(1, 3, 8, 8))
