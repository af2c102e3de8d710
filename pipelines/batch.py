"""The contract shared by every pipeline (DESIGN.md): the batch, the loader settings, the
epoch order and the seeding of augmentations. Imports torch alone (no PIL spec, no ffcv/dali).

A MultiCropBatch holds the global crops [G*B, 3, Hg, Wg] and the local crops [L*B, 3, Hl, Wl],
crop-major ([crop_0 of all B images | crop_1 ... ]), normalised, channels-last, in the compute
dtype, on the training device, and the labels [B]. The training step does not know which
pipeline made it.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class MultiCropBatch:
    global_crops: torch.Tensor  # [G*B, 3, Hg, Wg]
    local_crops: torch.Tensor  # [L*B, 3, Hl, Wl]; L may be 0
    labels: torch.Tensor  # [B] int64

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]


@functools.cache
def _mean_std_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, 1, 1] mean and std in uint8 units, made once per device (no copy per batch)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


@functools.cache
def mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, 1, 1] mean and std in [0, 1] units, made once per device."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)


def normalize_uint8(
    images: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool
) -> torch.Tensor:
    """uint8 [N, 3, H, W] (any device) -> normalised `dtype` on `device`.

    The copy is asynchronous from pinned memory; the arithmetic runs on the device in fp32,
    then casts, so a uint8 batch crosses the bus (4x less than float).
    """
    x = images.to(device, non_blocking=True)
    mean, std = _mean_std_255(torch.device(device))
    x = ((x.float() - mean) / std).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class Uint8MultiCrops:
    """What a CPU-side loader yields before the device stage: uint8 crops, crop-major."""

    global_crops: torch.Tensor  # [G*B, 3, Hg, Wg] uint8
    local_crops: torch.Tensor  # [L*B, 3, Hl, Wl] uint8
    labels: torch.Tensor  # [B] int64

    def pin_memory(self) -> Uint8MultiCrops:
        return Uint8MultiCrops(self.global_crops.pin_memory(), self.local_crops.pin_memory(),
                               self.labels.pin_memory())

    def to_batch(self, device: torch.device, dtype: torch.dtype,
                 channels_last: bool) -> MultiCropBatch:
        return MultiCropBatch(
            global_crops=normalize_uint8(self.global_crops, device, dtype, channels_last),
            local_crops=normalize_uint8(self.local_crops, device, dtype, channels_last),
            labels=self.labels.to(device, non_blocking=True),
        )


def derived_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from non-negative integer keys (e.g. seed, epoch, index)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def replacement_pairs(failed: np.ndarray) -> list[tuple[int, int]]:
    """(bad, donor) for each sample of a batch whose image failed to decode: the donor is the
    next good sample, cyclically. The bad sample takes the donor's image and label together
    (issue #26), so the batch keeps its size and no image trains under another's label."""
    failed = np.asarray(failed).astype(bool)
    bad, good = np.flatnonzero(failed), np.flatnonzero(~failed)
    if len(bad) and not len(good):
        raise RuntimeError(f"every image of a batch of {len(failed)} failed to decode: the "
                           "stored images are corrupt; rerun tools/convert_in1k.py")
    donors = good[np.searchsorted(good, bad) % max(len(good), 1)] if len(bad) else bad
    return list(zip(bad.tolist(), donors.tolist()))


def whole_steps(n: int, batch_size: int, world_size: int) -> int:
    """Steps per epoch: each rank's share of n images cut to whole batches, so that every rank
    takes the same number of steps (the rule of every pipeline)."""
    steps = n // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"{n} training images are fewer than one global batch "
                         f"({batch_size} x {world_size} processes)")
    return steps


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a seeded permutation per epoch, split across ranks, cut to
    whole batches so every rank takes the same number of steps; can start mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = whole_steps(n, batch_size, world_size)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        per_rank = self.steps_per_epoch * self.batch_size
        mine = order[self.rank::self.world_size][:per_rank]
        for index in mine[self.start_step * self.batch_size:].tolist():
            yield self.epoch, index


@dataclass(frozen=True)
class LoaderSettings:
    """What every pipeline's loader needs besides the data: where batches go and how."""

    batch_size: int  # per process
    num_workers: int
    seed: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    stage_impl: str = "torch"  # the multi-crop stage: torch | triton (RunPlan.stage_impl)
