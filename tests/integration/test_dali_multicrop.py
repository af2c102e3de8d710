"""pipelines/loaders/dali_multicrop.py in CPU mode (device_id=None) on tiny webdataset shards
written here with the converter's ShardWriter from demo JPEGs (the bytes of the files, not
re-encoded).

Tolerances (also in docs/DALI.md):
- CPU mode's photometric stage (pipelines/loaders/photometric_numba.py, tested against
  torchvision in tests/unit/test_photometric_numba.py) through DALI's numba_function
  equals a direct call exactly.
- the stage hand-off (photometric="stage": GPU mode's graph with "cpu" device strings): canvas
  and sizes equal PIL's decode of the same JPEGs exactly (both libjpeg-turbo), zeros outside
  the image; resized down (longer side > the canvas side) mean |diff| < 2.5 of 255 vs PIL's
  antialiased bilinear resize to the same size; batches equal GpuMultiCrop applied to the
  hand-off exactly; solid-colour images give crops of their own colour within 3 of 255.
- per-channel mean of the normalised crops vs the reference on the same images, 12 epochs of
  4 + 4 crops per image: within max(0.06, 4.5 standard errors of the difference); std within
  0.06 (normalised units); rate of grayscale crops within 4.5 binomial s.e.
- val batches vs ReferenceValData: labels equal, mean |diff| < 0.2 (normalised) at the best
  shift of at most one pixel.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from pipelines import demo_data
from pipelines.batch import LoaderSettings
from pipelines.convert.shards import ShardWriter
from pipelines.loaders.reference import MultiCropDataset, ReferenceValData, load_rgb
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, CropSpec, MultiCropSpec
from tests.helpers import assert_batch_contract

pytestmark = pytest.mark.dali

SPEC = MultiCropSpec(CropSpec(1, 64, (0.25, 1.0), blur_p=0.2, solarize_p=0.2),
                     CropSpec(2, 32, (0.05, 0.25), blur_p=0.5, solarize_p=0.0))


def _write_shards(out: Path, samples: list[tuple[str, int]], shard_size: int) -> None:
    writer = ShardWriter(out, shard_size)
    for path, label in samples:
        writer.add(label, Path(path).read_bytes())
    writer.close()


SIDE = 160  # the stage's canvas side in these tests: demo images are at most 119 x 159


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """demo JPEGs; dali/{train,val} in ImageFolder order; dali/ids: 26 samples whose label is
    their own index, so a label names the sample (shard size 7: shards of unequal size);
    dali/solid: 8 single-colour JPEGs of different sizes, label i has colour SOLID[i]."""
    root = tmp_path_factory.mktemp("dali")
    demo_data.write_dataset(str(root), train_per_class=3, val_per_class=2)
    for split in ("train", "val"):
        _write_shards(root / "dali" / split, ImageFolder(str(root / split)).samples, 7)
    train = ImageFolder(str(root / "train")).samples
    ids = [(train[i % len(train)][0], i) for i in range(26)]
    _write_shards(root / "dali" / "ids", ids, 7)
    (root / "solid").mkdir()
    for i, colour in enumerate(SOLID):
        size = (40 + 9 * i, 90 - 6 * i)  # (width, height): both orientations, all different
        Image.new("RGB", size, colour).save(root / "solid" / f"{i}.jpg", quality=95)
    _write_shards(root / "dali" / "solid",
                  [(str(root / "solid" / f"{i}.jpg"), i) for i in range(len(SOLID))], 3)
    return root


SOLID = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220),
         (220, 40, 220), (128, 128, 128), (250, 140, 10)]


def _settings(batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 3,
              dtype: torch.dtype = torch.float32, channels_last: bool = True):
    return LoaderSettings(batch_size=batch_size, num_workers=1, seed=seed, rank=rank,
                          world_size=world_size, device=torch.device("cpu"), dtype=dtype,
                          channels_last=channels_last)


def _train(root, split="train", spec: MultiCropSpec = SPEC, photometric=None, side=SIDE, **kw):
    from pipelines.loaders.dali_multicrop import DaliTrainData
    return DaliTrainData(str(root / "dali" / split), spec, _settings(**{"batch_size": 4, **kw}),
                         photometric=photometric, max_resolution=side)


# ---------------------------------------------------------------- contract, order
CONTRACT_CASES = [("numba", torch.float32, True), ("stage", torch.float32, True),
                  ("stage", torch.bfloat16, False)]


@pytest.mark.parametrize("photometric,dtype,channels_last", CONTRACT_CASES)
def test_epoch_yields_the_batch_contract(data_root, photometric, dtype, channels_last):
    data = _train(data_root, photometric=photometric, dtype=dtype, channels_last=channels_last)
    assert data.steps_per_epoch == 6
    batches = list(data.epoch(0))
    assert len(batches) == 6
    b = batches[0]
    assert_batch_contract(b, SPEC, data.settings)
    assert b.global_crops.shape == (4, 3, 64, 64) and b.local_crops.shape == (8, 3, 32, 32)
    assert b.global_crops.dtype == dtype == b.local_crops.dtype
    assert b.labels.dtype == torch.int64 and b.labels.shape == (4,)
    for crops in (b.global_crops, b.local_crops):
        assert crops.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert crops.is_contiguous() != channels_last
        assert torch.isfinite(crops.float()).all()
    labels = sorted(torch.cat([x.labels for x in batches]).tolist())
    assert labels == sorted(y for _, y in ImageFolder(str(data_root / "train")).samples)


@pytest.mark.parametrize("photometric", ["numba", "stage"])
def test_same_seed_same_batches_resume_continues_the_order(data_root, photometric):
    def run(epoch, steps=None, **kw):
        return list(itertools.islice(_train(data_root, photometric=photometric, **kw)
                                     .epoch(epoch), steps))

    first, again = run(1), run(1)
    resumed = list(_train(data_root, photometric=photometric).epoch(1, start_step=2))
    assert len(resumed) == 4
    for x, y in zip(first, again):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.local_crops, y.local_crops)
    for x, y in zip(first[2:], resumed):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.global_crops, y.global_crops)
        assert torch.equal(x.local_crops, y.local_crops)
    assert not torch.equal(first[0].global_crops, run(2, steps=1)[0].global_crops)
    assert not torch.equal(first[0].global_crops, run(1, steps=1, seed=4)[0].global_crops)


@pytest.mark.parametrize("photometric,epoch", [("numba", 0), ("numba", 3), ("stage", 3)])
def test_two_ranks_cover_an_epoch_once_without_overlap(data_root, photometric, epoch):
    seen = []
    for rank in (0, 1):
        data = _train(data_root, "ids", photometric=photometric, rank=rank, world_size=2)
        assert data.steps_per_epoch == 26 // 8
        ids = torch.cat([b.labels for b in data.epoch(epoch)]).tolist()
        assert len(ids) == len(set(ids)) == 12  # each rank: 3 steps, no sample twice
        seen.append(set(ids))
    assert not seen[0] & seen[1] and seen[0] | seen[1] <= set(range(26))


def test_one_rank_epoch_is_a_shuffled_permutation(data_root):
    data = _train(data_root, "ids", batch_size=2)
    orders = [torch.cat([b.labels for b in data.epoch(e)]).tolist() for e in (0, 1)]
    for order in orders:
        assert sorted(order) == list(range(26))
    assert orders[0] != orders[1] and orders[0] != list(range(26))


def test_missing_folder_and_index_are_clear_errors(data_root, tmp_path):
    from pipelines.loaders.dali_multicrop import DaliTrainData
    with pytest.raises(FileNotFoundError, match="convert_in1k"):
        DaliTrainData(str(tmp_path / "nope"), SPEC, _settings(4))
    broken = tmp_path / "broken"
    _write_shards(broken, ImageFolder(str(data_root / "train")).samples[:5], 7)
    (broken / "shard-000000.idx").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000000.idx"):
        DaliTrainData(str(broken), SPEC, _settings(4))


def test_photometric_choice_defaults_by_device_and_rejects_ops():
    from pipelines.loaders.dali_multicrop import photometric_impl
    assert photometric_impl(None, gpu=True) == "stage"
    assert photometric_impl(None, gpu=False) == "numba"
    assert photometric_impl("stage", gpu=False) == "stage"
    with pytest.raises(ValueError, match="accepted values are numba, stage"):
        photometric_impl("ops", gpu=True)
    with pytest.raises(ValueError, match="CPU mode only"):
        photometric_impl("numba", gpu=True)


def test_build_data_routes_dali(data_root):
    from trex_fast.config import make_config
    from trex_fast.data import build_data
    from trex_fast.distributed import DistInfo
    from trex_fast.plan import make_plan
    cfg = make_config("demo", pipeline="dali", global_size=64, local_size=32, batch_size=4,
                      num_workers=1, device="cpu")
    plan = make_plan(cfg, DistInfo(0, 1, 0, 1), num_classes=0, steps_per_epoch=0,
                     data_root=str(data_root), pipeline="dali")
    train, val = build_data(cfg, plan)
    assert type(train).__name__ == "DaliTrainData" and type(val).__name__ == "DaliValData"
    assert train.photometric == "numba"  # CPU device


# ---------------------------------------------------------------- the stage hand-off
def test_hand_off_is_the_decoded_image_at_the_top_left(data_root):
    """canvas [B, S, S, 3] uint8 and sizes [B, 2] = PIL's decode of the same JPEG, zeros
    elsewhere, over a whole epoch (every sample once)."""
    train = ImageFolder(str(data_root / "train")).samples
    data = _train(data_root, "ids", photometric="stage", batch_size=5)
    seen = []
    for canvas, sizes, labels in data.decoded(0):
        assert canvas.dtype == torch.uint8 and canvas.shape == (5, SIDE, SIDE, 3)
        assert sizes.dtype == torch.int32 and sizes.shape == (5, 2)
        for b, sample in enumerate(labels.tolist()):
            image = np.asarray(load_rgb(train[sample % len(train)][0]))
            h, w = sizes[b].tolist()
            assert (h, w) == image.shape[:2]
            assert np.array_equal(canvas[b, :h, :w].numpy(), image)
            assert not canvas[b, h:].any() and not canvas[b, :, w:].any()
            seen.append(sample)
    assert len(seen) == len(set(seen)) == 25  # 26 // 5 steps of 5


def test_hand_off_resizes_images_larger_than_the_canvas_down_to_it(data_root):
    side = 100  # below every demo image's width (112..159): all are resized
    train = ImageFolder(str(data_root / "train")).samples
    data = _train(data_root, "ids", photometric="stage", side=side, batch_size=8)
    diffs = []
    for canvas, sizes, labels in data.decoded(0):
        assert canvas.shape == (8, side, side, 3)
        for b, sample in enumerate(labels.tolist()):
            image = load_rgb(train[sample % len(train)][0])
            h, w = sizes[b].tolist()
            assert w == side and abs(h - image.height * side / image.width) <= 1
            expected = np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.float64)
            diffs.append(np.abs(canvas[b, :h, :w].numpy() - expected).mean())
            assert not canvas[b, h:].any()
    assert float(np.mean(diffs)) < 2.5, diffs


def test_stage_batches_are_gpu_multicrop_of_the_hand_off(data_root):
    """epoch() = GpuMultiCrop(spec, ..., seed, rank)(canvas, sizes, labels, epoch, step): the
    same stage as the FFCV path, with this rank's draws (rank 0's stage gives other crops)."""
    from pipelines.stage.dispatch import GpuMultiCrop
    data = _train(data_root, "ids", photometric="stage", rank=1, world_size=2)
    batches = list(data.epoch(2, start_step=1))
    hand_off = list(data.decoded(2, start_step=1))
    assert len(batches) == len(hand_off) == 2
    s = data.settings
    for rank in (1, 0):
        stage = GpuMultiCrop(SPEC, s.device, s.dtype, s.channels_last, s.seed, rank=rank)
        for step, (batch, (canvas, sizes, labels)) in enumerate(zip(batches, hand_off), 1):
            expected = stage(canvas, sizes, labels, 2, step)
            assert torch.equal(batch.labels, expected.labels)
            same = (torch.equal(batch.global_crops, expected.global_crops)
                    and torch.equal(batch.local_crops, expected.local_crops))
            assert same == (rank == 1), (rank, step)


def test_stage_crops_are_crop_major_and_follow_their_labels(data_root):
    """Single-colour images and no photometric ops: every crop has its own image's colour, so
    global crop b and local crop k*B + b must show the colour of labels[b]."""
    plain = dict(blur_p=0.0, solarize_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    spec = MultiCropSpec(CropSpec(2, 24, (0.25, 1.0), **plain),
                         CropSpec(3, 12, (0.05, 0.25), **plain))
    data = _train(data_root, "solid", spec=spec, photometric="stage", batch_size=4)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    labels = []
    for batch in data.epoch(0):
        colours = torch.tensor([SOLID[y] for y in batch.labels.tolist()], dtype=torch.float32)
        for crops, count in ((batch.global_crops, 2), (batch.local_crops, 3)):
            pixels = (crops.float() * std + mean) * 255  # [count*B, 3, S, S]
            expected = colours.repeat(count, 1)[:, :, None, None]  # crop-major: k*B + b
            assert (pixels - expected).abs().max() <= 3, batch.labels
        labels += batch.labels.tolist()
    assert sorted(labels) == list(range(len(SOLID)))


def test_dlpack_tensor_shares_dali_memory():
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.loaders.dali_multicrop import dlpack_tensor

    @pipeline_def(batch_size=3, num_threads=1, device_id=None, seed=0)
    def graph():
        return fn.random.uniform(range=(0, 255), shape=[5, 7, 3], dtype=types.FLOAT)

    (out,) = graph().run()
    tensor = dlpack_tensor(out)
    assert tensor.shape == (3, 5, 7, 3) and tensor.data_ptr() == out.data_ptr()
    assert np.array_equal(tensor.numpy(), np.array(out.as_tensor()))


def test_canvas_side_from_argument_meta_json_or_default(tmp_path):
    import json

    from pipelines.convert.options import ConvertOptions
    from pipelines.loaders.dali_multicrop import canvas_side
    folder = tmp_path / "dali" / "train"
    folder.mkdir(parents=True)
    assert canvas_side(str(folder)) == ConvertOptions.max_resolution == 500
    (tmp_path / "meta.json").write_text(json.dumps({"options": {"max_resolution": 320}}))
    assert canvas_side(str(folder)) == 320
    assert canvas_side(str(folder), 128) == 128
    with pytest.raises(ValueError, match="max_resolution=0"):
        canvas_side(str(folder), 0)


# ---------------------------------------------------------------- val
def test_val_matches_reference_val_and_shards_count_each_image_once(data_root):
    from pipelines.loaders.dali_multicrop import DaliValData
    ours = list(DaliValData(str(data_root / "dali" / "val"), 64, _settings(5)))
    ref = list(ReferenceValData(str(data_root / "val"), 64, _settings(5)))
    assert torch.equal(torch.cat([y for _, y in ours]), torch.cat([y for _, y in ref]))
    x, y = torch.cat([x for x, _ in ours]), torch.cat([x for x, _ in ref])
    # DALI rounds the centre-crop anchor (in - crop) / 2 half up, torchvision half to even:
    # one pixel apart when in - crop is odd; compare at the best shift of at most one pixel
    diffs = [(x[..., max(dy, 0):x.shape[2] + min(dy, 0), max(dx, 0):x.shape[3] + min(dx, 0)]
              - y[..., max(-dy, 0):y.shape[2] + min(-dy, 0), max(-dx, 0):y.shape[3] + min(-dx, 0)]
              ).abs().mean().item() for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert min(diffs) < 0.2, diffs
    ids = []
    for rank in (0, 1):  # 26 samples over 2 ranks with batch 4: partial last batches
        val = DaliValData(str(data_root / "dali" / "ids"), 64, _settings(4, rank, 2))
        ids += torch.cat([y for _, y in val]).tolist()
    assert sorted(ids) == list(range(26))


# ---------------------------------------------------------------- CPU mode's numba operator
def _run_op(images: list[np.ndarray], op) -> list[np.ndarray]:
    """Apply `op(node)` to HWC uint8 images in a one-batch CPU DALI pipeline."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
    def graph():
        return op(fn.external_source(source=lambda: images, layout="HWC"))

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(images))]


@pytest.fixture(scope="module")
def photos(data_root) -> list[np.ndarray]:
    paths = [p for p, _ in ImageFolder(str(data_root / "train")).samples[::3]]
    return [np.asarray(load_rgb(p))[:96, :96].copy() for p in paths]


def test_numba_op_in_dali_equals_the_direct_call(photos):
    """photometric_numba_op through DALI's numba_function = photometric_numba.augment called
    directly with the same uniforms (CPU mode's whole photometric stage)."""
    from nvidia.dali import fn

    from pipelines.loaders.dali_graphs import photometric_numba_op
    from pipelines.loaders.photometric_numba import NUM_DRAWS, augment, spec_vector
    group = SPEC.global_group
    rng = np.random.default_rng(4)
    uniforms = [rng.random(NUM_DRAWS, dtype=np.float32) for _ in photos]
    uniforms[0][:] = 0.01  # every op applied, so the test covers all of them
    through_dali = _run_op(photos, lambda x: photometric_numba_op(
        x, group, fn.external_source(source=lambda: uniforms)))
    for image, u, got in zip(photos, uniforms, through_dali):
        expected = np.empty_like(image)
        augment(expected, image, u, spec_vector(group))
        assert np.array_equal(got, expected)
    assert not np.array_equal(through_dali[0], photos[0])


# ---------------------------------------------------------------- distributions
def _uint8(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def _stats(crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    x = torch.cat(crops).float()
    gray = (_uint8(x).amax(1) - _uint8(x).amin(1)).amax((1, 2)) < 1.0
    return x.mean((0, 2, 3)), x.std((0, 2, 3)), gray.float().mean().item(), len(x)


# More crops per image than SPEC: the augmentation noise of a pooled channel mean is ~0.2
# (normalised) per epoch of 24 single crops, so SPEC's counts at 12 epochs leave a standard error
# of the difference (~0.07) above any useful tolerance.
STATS_SPEC = MultiCropSpec(dataclasses.replace(SPEC.global_group, count=4),
                           dataclasses.replace(SPEC.local_group, count=4))


def _epoch_means(crops: list[list[torch.Tensor]]) -> torch.Tensor:
    """[epochs, 3] per-channel means; every epoch holds each image once, so the spread of
    these is augmentation noise only (the images themselves are common to both pipelines)."""
    return torch.stack([torch.cat(c).float().mean((0, 2, 3)) for c in crops])


def test_crop_statistics_match_the_reference(data_root):
    """Pooled per-channel mean within max(0.06, 4.5 standard errors of the difference, from
    the per-epoch means), std within 0.06, grey rate within 4.5 binomial s.e."""
    from pipelines.batch import normalize_uint8
    data, epochs = _train(data_root, spec=STATS_SPEC, batch_size=8), 12
    ours: dict[int, list[list[torch.Tensor]]] = {0: [], 1: []}
    for e in range(epochs):
        batches = list(data.epoch(e))
        ours[0].append([b.global_crops for b in batches])
        ours[1].append([b.local_crops for b in batches])
    ref = MultiCropDataset(str(data_root / "train"), STATS_SPEC, seed=5)
    theirs: dict[int, list[list[torch.Tensor]]] = {0: [], 1: []}
    for e in range(epochs):
        samples = [ref[(e, i)] for i in range(len(ref))]
        for group in (0, 1):
            theirs[group].append([
                normalize_uint8(c[None].float(), torch.device("cpu"), torch.float32, False)
                for s in samples for c in s[group]])
    for group in (0, 1):
        e1, e2 = _epoch_means(ours[group]), _epoch_means(theirs[group])
        se = ((e1.var(0) + e2.var(0)) / epochs).sqrt()
        m1, s1, g1, n = _stats([c for epoch in ours[group] for c in epoch])
        m2, s2, g2, _ = _stats([c for epoch in theirs[group] for c in epoch])
        tol = torch.clamp(4.5 * se, min=0.06)
        assert ((m1 - m2).abs() < tol).all() and (s1 - s2).abs().max() < 0.06, \
            (group, m1, m2, tol, s1, s2)
        se_gray = math.sqrt(g2 * (1 - g2) * 2 / n) + 1e-9
        assert abs(g1 - g2) < 4.5 * se_gray, (group, g1, g2)
