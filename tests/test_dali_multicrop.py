"""pipelines/dali_multicrop.py in CPU mode (device_id=None) on tiny webdataset shards written here
with the converter's ShardWriter from demo JPEGs (the bytes of the files, not re-encoded).

Tolerances (also in docs/DALI.md):
- CPU mode's photometric stage (pipelines/photometric_numba.py, tested against torchvision in
  tests/test_photometric_numba.py) through DALI's numba_function equals a direct call exactly.
- GPU mode's DALI operators ("ops", run here on the CPU) vs torchvision's float ops: jitter in
  the order of the keys max |diff| <= 4 of 255 and mean < 0.5 (uint8 rounding after each op),
  3x closer to that order than to the reverse one; grayscale max 2 and exactly grey, solarize
  exact, blur (same sigma, window 2*ceil(3*sigma)+1) mean < 1, the whole chain mean < 1.
- per-channel mean of the normalised crops vs the reference on the same images, 12 epochs of
  4 + 4 crops per image: within max(0.06, 4.5 standard errors of the difference); std within
  0.06 (normalised units); rate of grayscale crops within 4.5 binomial s.e.
- val batches vs ReferenceValData: labels equal, mean |diff| < 0.05 (normalised).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.datasets import ImageFolder

from pipelines.convert.shards import ShardWriter
from pipelines.reference import LoaderSettings, MultiCropDataset, ReferenceValData, load_rgb
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, CropSpec, MultiCropSpec
from tests.helpers import torchvision_photometric
from trex_fast import demo_data

pytestmark = pytest.mark.dali

SPEC = MultiCropSpec(CropSpec(1, 64, (0.25, 1.0), blur_p=0.2, solarize_p=0.2),
                     CropSpec(2, 32, (0.05, 0.25), blur_p=0.5, solarize_p=0.0))


def _write_shards(out: Path, samples: list[tuple[str, int]], shard_size: int) -> None:
    writer = ShardWriter(out, shard_size)
    for path, label in samples:
        writer.add(label, Path(path).read_bytes())
    writer.close()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """demo JPEGs; dali/{train,val} in ImageFolder order; dali/ids: 26 samples whose label is
    their own index, so a label names the sample (shard size 7: shards of unequal size)."""
    root = tmp_path_factory.mktemp("dali")
    demo_data.write_dataset(str(root), train_per_class=3, val_per_class=2)
    for split in ("train", "val"):
        _write_shards(root / "dali" / split, ImageFolder(str(root / split)).samples, 7)
    train = ImageFolder(str(root / "train")).samples
    ids = [(train[i % len(train)][0], i) for i in range(26)]
    _write_shards(root / "dali" / "ids", ids, 7)
    return root


def _settings(batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 3):
    return LoaderSettings(batch_size=batch_size, num_workers=1, seed=seed, rank=rank,
                          world_size=world_size, device=torch.device("cpu"),
                          dtype=torch.float32, channels_last=True)


def _train(root, split="train", spec: MultiCropSpec = SPEC, photometric=None, **kw):
    from pipelines.dali_multicrop import DaliTrainData
    return DaliTrainData(str(root / "dali" / split), spec, _settings(**{"batch_size": 4, **kw}),
                         photometric=photometric)


# ---------------------------------------------------------------- contract, order
@pytest.mark.parametrize("photometric", ["numba", "ops"])  # ops: GPU mode's graph, on the CPU
def test_epoch_yields_the_batch_contract(data_root, photometric):
    data = _train(data_root, photometric=photometric)
    assert data.num_classes == len(demo_data.PATTERNS) and data.steps_per_epoch == 6
    batches = list(data.epoch(0))
    assert len(batches) == 6
    b = batches[0]
    assert b.global_crops.shape == (4, 3, 64, 64) and b.local_crops.shape == (8, 3, 32, 32)
    assert b.global_crops.dtype == torch.float32 and b.labels.dtype == torch.int64
    assert b.global_crops.is_contiguous(memory_format=torch.channels_last)
    assert b.local_crops.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(b.global_crops).all() and torch.isfinite(b.local_crops).all()
    labels = sorted(torch.cat([x.labels for x in batches]).tolist())
    assert labels == sorted(y for _, y in ImageFolder(str(data_root / "train")).samples)


def test_same_seed_same_batches_resume_continues_the_order(data_root):
    first = list(_train(data_root).epoch(1))
    again = list(_train(data_root).epoch(1))
    resumed = list(_train(data_root).epoch(1, start_step=2))
    assert len(resumed) == 4
    for x, y in zip(first, again):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.local_crops, y.local_crops)
    for x, y in zip(first[2:], resumed):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.global_crops, y.global_crops)
    other_epoch = list(_train(data_root).epoch(2))
    assert not torch.equal(first[0].global_crops, other_epoch[0].global_crops)
    other_seed = list(_train(data_root, seed=4).epoch(1))
    assert not torch.equal(first[0].global_crops, other_seed[0].global_crops)


@pytest.mark.parametrize("epoch", [0, 3])
def test_two_ranks_cover_an_epoch_once_without_overlap(data_root, epoch):
    seen = []
    for rank in (0, 1):
        data = _train(data_root, "ids", rank=rank, world_size=2)
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
    from pipelines.dali_multicrop import DaliTrainData
    with pytest.raises(FileNotFoundError, match="convert_in1k"):
        DaliTrainData(str(tmp_path / "nope"), SPEC, _settings(4))
    broken = tmp_path / "broken"
    _write_shards(broken, ImageFolder(str(data_root / "train")).samples[:5], 7)
    (broken / "shard-000000.idx").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000000.idx"):
        DaliTrainData(str(broken), SPEC, _settings(4))


def test_build_data_routes_dali(data_root):
    from trex_fast.config import make_config
    from trex_fast.data import build_data
    cfg = make_config("demo", pipeline="dali", global_size=64, local_size=32)
    train, val = build_data(cfg, str(data_root), _settings(4))
    assert type(train).__name__ == "DaliTrainData" and type(val).__name__ == "DaliValData"


# ---------------------------------------------------------------- val
def test_val_matches_reference_val_and_shards_count_each_image_once(data_root):
    from pipelines.dali_multicrop import DaliValData
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


# ---------------------------------------------------------------- op mappings
def _run_op(images: list[np.ndarray], op) -> list[np.ndarray]:
    """Apply `op(node)` to HWC uint8 images in a one-batch CPU DALI pipeline."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0,
                  enable_conditionals=True)
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


def _torch(images: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(a).permute(2, 0, 1) for a in images]


def _max_and_mean_diff(ours: list[np.ndarray], theirs: list[torch.Tensor]):
    d = [np.abs(o.astype(float) - t.permute(1, 2, 0).numpy().astype(float))
         for o, t in zip(ours, theirs)]
    return max(x.max() for x in d), float(np.mean([x.mean() for x in d]))


def _ops_through_dali(photos, jitter, keys, gray=False, blur_sigma=None,
                     solarize_threshold=None) -> list[np.ndarray]:
    """GPU mode's photometric_ops on the CPU, with the given parameters as per-sample draws."""
    from nvidia.dali import fn

    from pipelines.dali_multicrop import photometric_ops
    from pipelines.photometric_numba import make_params
    params = make_params(jitter, keys, gray, blur_sigma, solarize_threshold)
    return _run_op(photos, lambda x: photometric_ops(
        x, [fn.random.uniform(values=[float(v)]) for v in params], gpu=False))


def _torchvision(photos, jitter, keys, **kw) -> list[torch.Tensor]:
    return [torch.from_numpy(torchvision_photometric(p, jitter, keys, **kw)).permute(2, 0, 1)
            for p in photos]


JITTER_CASES = [([1.3, 0.7, 1.2, 0.1], [0, 1, 2, 3]), ([0.7, 1.35, 0.8, -0.1], [3, 2, 1, 0]),
                ([1.2, 1.3, 1.2, 0.05], [2, 0, 3, 1]), ([0.6, 0.8, 1.0, -0.05], [1, 3, 0, 2]),
                ([1.0, 1.0, 1.0, 0.5], [0, 1, 2, 3])]


@pytest.mark.parametrize("jitter,keys", JITTER_CASES)
def test_ops_jitter_matches_torchvision_in_the_keys_order(photos, jitter, keys):
    """GPU mode's jitter (uint8 rounding after each op) against torchvision's float ops in the
    order of the keys; far closer to that order than to the reverse one."""
    ours = _ops_through_dali(photos, jitter, keys)
    worst, mean = _max_and_mean_diff(ours, _torchvision(photos, jitter, keys))
    assert worst <= 4 and mean < 0.5, (worst, mean)
    if jitter[:3] != [1.0, 1.0, 1.0]:
        wrong = _max_and_mean_diff(ours, _torchvision(photos, jitter, keys[::-1]))[1]
        assert 3 * mean < wrong, (mean, wrong)


def test_ops_chain_matches_torchvision(photos):
    kw = dict(gray=True, blur_sigma=1.3, solarize_threshold=128)
    ours = _ops_through_dali(photos, [1.3, 0.7, 1.1, -0.08], [2, 0, 3, 1], **kw)
    worst, mean = _max_and_mean_diff(ours, _torchvision(photos, [1.3, 0.7, 1.1, -0.08],
                                                        [2, 0, 3, 1], **kw))
    assert mean < 1, (worst, mean)  # blur borders: reflect-101 in DALI vs reflect


def test_numba_op_in_dali_equals_the_direct_call(photos):
    """photometric_numba_op through DALI's numba_function = photometric_numba.augment called
    directly with the same uniforms (CPU mode's whole photometric stage)."""
    from nvidia.dali import fn

    from pipelines.dali_multicrop import photometric_numba_op
    from pipelines.photometric_numba import NUM_DRAWS, augment, spec_vector
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


def test_grayscale_solarize_blur_match_torchvision(photos):
    from nvidia.dali import fn

    from pipelines.dali_multicrop import grayscale, solarize
    ts = _torch(photos)
    gray = _run_op(photos, grayscale)
    assert _max_and_mean_diff(gray, [TF.rgb_to_grayscale(x, 3) for x in ts])[0] <= 2
    assert all((g.max(2) == g.min(2)).all() for g in gray)  # exactly grey, as PIL's "L"
    sol = _run_op(photos, lambda x: solarize(x, 128))
    assert _max_and_mean_diff(sol, [TF.solarize(x, 128) for x in ts])[0] == 0
    for sigma in (0.5, 2.0):
        k = 2 * math.ceil(3 * sigma) + 1
        blur = _run_op(photos, lambda x, s=sigma: fn.gaussian_blur(x, sigma=s))
        _, mean = _max_and_mean_diff(blur, [TF.gaussian_blur(x, [k, k], [sigma, sigma])
                                            for x in ts])
        assert mean < 1, (sigma, mean)


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
