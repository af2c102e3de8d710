"""Where a batch's decoded uint8 images lie on the device, as the multi-crop stage reads them.

Three layouts, so that no decoder's output is copied into another layout first:
- CANVAS: [B, H, W, 3], image b at the top-left of its slot (stage/gpu_decode.py, DALI's pad);
- PACKED: [B, slot] rows, image b's h*w*3 bytes first with row stride w (the FFCV decoder's
  output: the stage reads it in place instead of unpacking it into a canvas);
- PLANES: one flat buffer of [3, h, w] planes (torchvision's decode_jpeg output, concatenated
  once), image b at element `offsets[b]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.stage.torch_spec import unpack_canvas

CANVAS, PACKED, PLANES = range(3)

# The per-sample int32 metadata a loader hands over next to the image slots, one row per sample:
# a loader that decodes writes the first two columns, one that hands over the stored bytes for
# a device decode writes all four. Writers index it by these names, readers use SampleMeta.
META_COLUMNS = ("height", "width", "nbytes", "is_jpeg")
HEIGHT, WIDTH, NBYTES, IS_JPEG = range(len(META_COLUMNS))


@dataclass(frozen=True)
class SampleMeta:
    """A loader's [B, 2] or [B, 4] metadata table (META_COLUMNS), read by column name."""

    table: torch.Tensor

    @property
    def sizes(self) -> torch.Tensor:
        """[B, 2] (height, width), a view: the stage's image sizes."""
        return self.table[:, HEIGHT:WIDTH + 1]

    @property
    def nbytes(self) -> torch.Tensor:
        """[B] the stored length of each sample's bytes (device decode only)."""
        return self.table[:, NBYTES]

    @property
    def is_jpeg(self) -> torch.Tensor:
        """[B] 1 where the stored bytes are a JPEG, 0 for raw pixels (device decode only)."""
        return self.table[:, IS_JPEG]


@dataclass(frozen=True)
class DeviceImages:
    data: torch.Tensor  # uint8; CANVAS [B, H, W, 3], PACKED [B, slot], PLANES [total]
    sizes: torch.Tensor  # [B, 2] integer (height, width), on the device
    layout: int  # CANVAS, PACKED or PLANES
    canvas_hw: tuple[int, int]  # the largest image the layout holds (H, W)
    offsets: torch.Tensor | None = None  # PLANES: [B] int64 element offset of image b (strided)

    @property
    def batch_size(self) -> int:
        return self.sizes.shape[0]

    @property
    def image_stride(self) -> int:
        """Elements from image b to image b + 1 (CANVAS and PACKED)."""
        return self.data.stride(0) if self.layout != PLANES else 0

    def to_canvas(self) -> torch.Tensor:
        """The [B, H, W, 3] canvas (zeros around each image), for the plain-torch stage."""
        if self.layout == CANVAS:
            return self.data
        if self.layout == PACKED:
            return unpack_canvas(self.data, self.sizes, *self.canvas_hw)
        canvas = torch.zeros(self.batch_size, *self.canvas_hw, 3, dtype=torch.uint8,
                             device=self.data.device)
        for b, ((h, w), start) in enumerate(zip(self.sizes.tolist(), self.offsets.tolist())):
            canvas[b, :h, :w] = self.data[start:start + 3 * h * w].view(3, h, w).permute(1, 2, 0)
        return canvas


def from_canvas(canvas: torch.Tensor, sizes: torch.Tensor) -> DeviceImages:
    if canvas.dtype != torch.uint8 or canvas.ndim != 4 or canvas.shape[-1] != 3:
        raise ValueError("canvas must be uint8 [B, H, W, 3], got "
                         f"{canvas.dtype} {tuple(canvas.shape)}")
    sizes = _check_sizes(sizes, canvas.shape[0])
    return DeviceImages(canvas.contiguous(), sizes.to(canvas.device, non_blocking=True), CANVAS,
                        (canvas.shape[1], canvas.shape[2]))


def from_packed(packed: torch.Tensor, sizes: torch.Tensor, height: int,
                width: int) -> DeviceImages:
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] < height * width * 3:
        raise ValueError(f"packed must be uint8 [B, >= {height * width * 3}], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    sizes = _check_sizes(sizes, packed.shape[0])
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    return DeviceImages(packed, sizes.to(packed.device, non_blocking=True), PACKED,
                        (height, width))


def from_planes(planes: list[torch.Tensor], sizes: torch.Tensor, height: int,
                width: int) -> DeviceImages:
    """decode_jpeg's [3, h, w] images (on the device), sizes [B, 2] on the CPU: one cat."""
    sizes = _check_sizes(sizes, len(planes))
    device = planes[0].device
    counts = sizes[:, 0].long() * sizes[:, 1].long() * 3  # CPU metadata: no device sync
    offsets = torch.cumsum(counts, 0) - counts
    data = torch.cat([p.reshape(-1) for p in planes])
    meta = torch.cat([sizes.long(), offsets[:, None]], dim=1)  # [B, 3]: height, width, offset
    if device.type == "cuda":
        meta = meta.pin_memory()
    meta = meta.to(device, non_blocking=True)  # one small copy for sizes and offsets
    return DeviceImages(data, meta[:, :2], PLANES, (height, width), meta[:, 2])


def _check_sizes(sizes: torch.Tensor, batch: int) -> torch.Tensor:
    """sizes with unit column stride (the kernels step rows by stride(0), columns by 1)."""
    if sizes.ndim != 2 or sizes.shape != (batch, 2) or sizes.is_floating_point():
        raise ValueError(f"sizes must be integer [B={batch}, 2] (height, width), got "
                         f"{sizes.dtype} {tuple(sizes.shape)}")
    return sizes if sizes.stride(1) == 1 else sizes.contiguous()
