"""The reference pipeline: the batch contract, determinism, sharding, mid-epoch starts."""
import torch

from pipelines.batch import MultiCropBatch
from pipelines.demo_data import write_dataset
from pipelines.loaders.reference import (
    EpochSampler,
    LoaderSettings,
    MultiCropDataset,
    ReferenceTrainData,
    ReferenceValData,
    collate_multicrop,
)
from pipelines.spec import IMAGENET_MEAN, multicrop_spec
from tests.helpers import assert_batch_contract, tiny_config


def _settings(**overrides):
    values = dict(batch_size=4, num_workers=0, seed=3, rank=0, world_size=1,
                  device=torch.device("cpu"), dtype=torch.float32, channels_last=True)
    values.update(overrides)
    return LoaderSettings(**values)


def test_batch_contract_crop_major_channels_last_normalised(tmp_path):
    write_dataset(str(tmp_path), train_per_class=2, val_per_class=1)
    cfg = tiny_config(local_crops=3)
    data = ReferenceTrainData(str(tmp_path / "train"), multicrop_spec(cfg), _settings())
    batch = next(iter(data.epoch(0)))
    assert isinstance(batch, MultiCropBatch)
    assert_batch_contract(batch, multicrop_spec(cfg), _settings())
    assert batch.global_crops.shape == (4, 3, 32, 32)  # [G*B, 3, Hg, Wg]
    assert batch.local_crops.shape == (12, 3, 16, 16)  # [L*B, 3, Hl, Wl]
    assert batch.global_crops.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.shape == (4,) and batch.labels.dtype == torch.long
    lo = (0 - max(IMAGENET_MEAN)) / 0.224
    assert batch.global_crops.min() >= lo - 0.1 and batch.global_crops.max() <= 2.7
    assert data.steps_per_epoch == 16 // 4


def test_crop_major_order_and_per_sample_determinism(tmp_path):
    write_dataset(str(tmp_path), train_per_class=1, val_per_class=1)
    spec = multicrop_spec(tiny_config(local_crops=2))
    ds = MultiCropDataset(str(tmp_path / "train"), spec, seed=7)
    a, b = ds[(0, 1)], ds[(0, 2)]
    crops = collate_multicrop([a, b])
    assert torch.equal(crops.local_crops[0], a[1][0]) and torch.equal(crops.local_crops[1], b[1][0])
    assert torch.equal(crops.local_crops[2], a[1][1])  # [crop_0 of all B | crop_1 of all B]
    again = ds[(0, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], again[0] + again[1]))
    other_epoch = ds[(1, 1)]
    assert not torch.equal(a[0][0], other_epoch[0][0])
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    ds[(0, 3)]
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is left alone


def test_sampler_shards_are_disjoint_equal_and_can_start_mid_epoch():
    ranks = [EpochSampler(50, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    keys = [list(s) for s in ranks]
    assert len(keys[0]) == len(keys[1]) == 24  # 50 // 8 = 6 steps of 4 per rank
    assert not {i for _, i in keys[0]} & {i for _, i in keys[1]}
    ranks[0].set_epoch(0, start_step=2)
    assert list(ranks[0]) == keys[0][8:]
    ranks[0].set_epoch(1)
    assert [i for _, i in ranks[0]] != [i for _, i in keys[0]]  # a new order each epoch


def test_val_shards_count_every_image_once(tmp_path):
    write_dataset(str(tmp_path), train_per_class=1, val_per_class=3)
    seen = []
    for rank in range(3):
        val = ReferenceValData(str(tmp_path / "val"), 32, _settings(rank=rank, world_size=3))
        seen += [labels for _, labels in val]
    assert sum(len(x) for x in seen) == 24
    assert sorted(torch.cat(seen).tolist()) == sorted(list(range(8)) * 3)
