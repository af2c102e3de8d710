"""The FFCV loader's decode strategies, one object per mode, chosen once at construction
(`decode_strategy`): what FFCV hands out per sample and how one loader batch becomes the stage's
input (pipelines.stage.handoff.DeviceImages, plus the labels). No mode string is read per batch.

- `CpuDecode` (decode="cpu"): FFCV decodes each JPEG into a packed slot (ffcv_ops.CanvasDecoder)
  and writes (height, width); a JPEG that fails is replaced on the host by another sample of the
  batch; only the used prefix of each slot travels to the device (pinned staging), where the
  stage reads the packed rows in place.
- `GpuDecode` (decode="gpu", issue 9): FFCV copies each sample's stored bytes
  (ffcv_ops.BytesPassthrough) and writes (height, width, nbytes, is_jpeg); the batch's JPEGs are
  decoded in one torchvision.io.decode_jpeg call on the device (nvJPEG on CUDA), a JPEG that
  fails there taking another sample's image and label.
Both know their slot's canvas shape (Hmax, Wmax, 3) from the .beton's metadata at construction.
"""
from __future__ import annotations

import numpy as np
import torch
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader

from pipelines.batch import replacement_pairs
from pipelines.loaders.ffcv_ops import (
    BytesPassthrough,
    CanvasDecoder,
    ImageSizeDecoder,
    SampleInfoDecoder,
    canvas_size,
    decode_failed,
    image_metadata,
    max_stored_bytes,
)
from pipelines.stage.gpu_decode import decode_images
from pipelines.stage.handoff import DeviceImages, SampleMeta, from_packed
from pipelines.stage.overlap import PinnedPrefixCopy, packed_prefix_bytes


def replace_corrupt(data: torch.Tensor, sizes: torch.Tensor, labels: torch.Tensor,
                    failed: np.ndarray) -> int:
    """Overwrite each sample whose decode failed (failed[i] true) with another sample of the
    batch, its bytes, size and label together (the next good one, cyclically), so the batch
    keeps its size and every image trains under its own label; returns how many were
    replaced. Host tensors only (the loader's buffers, before any copy to the device)."""
    if not failed.any():  # the common case: one vectorised test per batch
        return 0
    pairs = replacement_pairs(failed)
    for i, j in pairs:
        data[i], sizes[i], labels[i] = data[j], sizes[j], labels[j]
    return len(pairs)


class CpuDecode:
    """decode="cpu": packed decodes in, packed rows on the device out."""

    name = "cpu"

    def __init__(self, canvas_hw: tuple[int, int]):
        self.canvas_shape = (*canvas_hw, 3)  # the slot's largest image, (Hmax, Wmax, 3)
        self.host_to_device: PinnedPrefixCopy | None = None  # made per epoch (start_epoch)

    @classmethod
    def from_reader(cls, reader: Reader, canvas_hw: tuple[int, int]) -> CpuDecode:
        return cls(canvas_hw)

    def ops(self) -> tuple[Operation, Operation]:
        """FFCV's (image op, metadata op) of this mode."""
        return CanvasDecoder(self.canvas_shape[:2]), ImageSizeDecoder()

    def on_host(self, data: torch.Tensor, meta: torch.Tensor, labels: torch.Tensor) -> int:
        """The decoder's status bytes, already on the host: replace the samples that failed
        (in FFCV's buffers); returns how many."""
        return replace_corrupt(data, meta, labels, decode_failed(data))

    def start_epoch(self, device: torch.device) -> None:
        self.host_to_device = PinnedPrefixCopy(device)

    def to_images(self, data: torch.Tensor, meta: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> tuple[DeviceImages, int]:
        """Train: (images on the device, 0): only each row's used prefix is copied."""
        sizes = SampleMeta(meta).sizes
        packed = self.host_to_device(data, packed_prefix_bytes(sizes))
        return from_packed(packed, sizes, *self.canvas_shape[:2]), 0

    def to_canvas(self, data: torch.Tensor, meta: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
        """Val: the [B, Hmax, Wmax, 3] canvas on the device."""
        packed = data.to(device, non_blocking=True)
        return from_packed(packed, SampleMeta(meta).sizes, *self.canvas_shape[:2]).to_canvas()


class GpuDecode:
    """decode="gpu": stored bytes in, decoded planes on the device out."""

    name = "gpu"

    def __init__(self, canvas_hw: tuple[int, int], max_bytes: int):
        self.canvas_shape = (*canvas_hw, 3)  # the largest image a sample may decode to
        self.max_bytes = max_bytes  # the largest stored sample: the slot holds it too
        self.host_to_device = None  # the bytes go to decode_jpeg, not through a staging copy

    @classmethod
    def from_reader(cls, reader: Reader, canvas_hw: tuple[int, int]) -> GpuDecode:
        return cls(canvas_hw, max_stored_bytes(reader))

    def ops(self) -> tuple[Operation, Operation]:
        return BytesPassthrough(self.max_bytes, self.canvas_shape[:2]), SampleInfoDecoder()

    def on_host(self, data: torch.Tensor, meta: torch.Tensor, labels: torch.Tensor) -> int:
        return 0  # nothing is decoded on the host: failures are found on the device

    def start_epoch(self, device: torch.device) -> None:
        pass

    def to_images(self, data: torch.Tensor, meta: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> tuple[DeviceImages, int]:
        """Train: (images on the device, how many JPEGs failed); a failed sample takes
        another's image (decode_images) and, here, its label."""
        replaced = []
        images = decode_images(data, meta, *self.canvas_shape[:2], device, replaced)
        for bad, donor in replaced:
            labels[bad] = labels[donor]
        return images, len(replaced)

    def to_canvas(self, data: torch.Tensor, meta: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
        """Val: the canvas; a JPEG that fails to decode raises, naming the sample."""
        return decode_images(data, meta, *self.canvas_shape[:2], device).to_canvas()


DECODE_MODES = {"cpu": CpuDecode, "gpu": GpuDecode}


def check_decode(decode: str) -> None:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: accepted values are {', '.join(DECODE_MODES)}")


def decode_strategy(decode: str, reader: Reader,
                    max_size: tuple[int, int] | None = None) -> CpuDecode | GpuDecode:
    """The strategy of `decode` for the .beton `reader` reads; a bad mode is refused first.
    `max_size`: the slot's (H, W) if not the largest image of the file (must hold it)."""
    check_decode(decode)
    return DECODE_MODES[decode].from_reader(reader, canvas_size(image_metadata(reader), max_size))
