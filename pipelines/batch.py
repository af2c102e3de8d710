"""The batch contract shared by every pipeline (DESIGN.md).

A MultiCropBatch holds the global crops [G*B, 3, Hg, Wg] and the local crops [L*B, 3, Hl, Wl],
crop-major ([crop_0 of all B images | crop_1 ... ]), normalised, channels-last, in the compute
dtype, on the training device, and the labels [B]. The training step does not know which
pipeline made it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

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
