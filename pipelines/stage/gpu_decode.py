"""Batched JPEG decode on the training device, for the FFCV loader's decode="gpu" mode.

The FFCV side (pipelines/loaders/ffcv_ops.BytesPassthrough) hands out each sample's stored bytes
unchanged: a JPEG, or raw pixels packed h*w*3 (row stride w). Here the whole batch's JPEGs go
through one torchvision.io.decode_jpeg call (nvJPEG, batched, on CUDA; libjpeg on CPU, which
is what the tests run); the decoded [3, h, w] images and any raw samples are concatenated
once into a DeviceImages that GpuMultiCrop reads in place. Imports no ffcv.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.batch import replacement_pairs
from pipelines.stage.handoff import META_COLUMNS, DeviceImages, SampleMeta, from_planes


def _decode_each(streams: list[torch.Tensor], device: torch.device) -> list:
    """The batch's JPEGs decoded in one call; when that call fails (a corrupt stream fails
    the whole batch), one call per stream to find which: None for each that fails."""
    try:
        return decode_jpeg(streams, device=device, mode=ImageReadMode.RGB)
    except RuntimeError:
        decoded = []
        for stream in streams:  # the rare path only: a batch holding a corrupt JPEG
            try:
                decoded.append(decode_jpeg(stream, device=device, mode=ImageReadMode.RGB))
            except RuntimeError:
                decoded.append(None)
        return decoded


def decode_images(stored: torch.Tensor, info: torch.Tensor, height: int, width: int,
                  device: torch.device | str, replaced: list | None = None) -> DeviceImages:
    """stored [B, slot] uint8 on the CPU (sample b's bytes first), info [B, 4] int on the CPU
    (height, width, nbytes, is_jpeg) -> the batch's images on `device` as [3, h, w] planes,
    concatenated once (DeviceImages PLANES): the multi-crop kernels read them in place, so no
    per-image copy into a canvas is made. `height`, `width`: the largest image allowed.

    A JPEG that fails to decode (or disagrees with its stored size) raises ValueError naming
    the sample; with a `replaced` list, it takes the image of another sample of the batch
    instead, and (bad, donor) is appended so the caller gives it the donor's label too."""
    if stored.dtype != torch.uint8 or stored.ndim != 2 or stored.device.type != "cpu":
        raise ValueError(f"stored must be CPU uint8 [B, slot], got {stored.dtype} "
                         f"{tuple(stored.shape)} on {stored.device}")
    if info.ndim != 2 or info.shape != (stored.shape[0], len(META_COLUMNS)):
        raise ValueError(f"info must be [B, {len(META_COLUMNS)}] ({', '.join(META_COLUMNS)}), "
                         f"got {tuple(info.shape)}")
    device = torch.device(device)
    meta = SampleMeta(info)  # CPU metadata (numpy() refuses device tensors): no device sync
    hw = [(int(h), int(w)) for h, w in meta.sizes.numpy()]
    nbytes, is_jpeg = meta.nbytes.numpy(), meta.is_jpeg.numpy()
    jpeg = [i for i, flag in enumerate(is_jpeg) if flag]
    # views, no copy: decode_jpeg wants one 1-D CPU tensor per image (batched nvJPEG on CUDA)
    decoded = dict(zip(jpeg, _decode_each([stored[i, :int(nbytes[i])] for i in jpeg],
                                          device))) if jpeg else {}
    planes, failed = [], np.zeros(len(hw), dtype=bool)
    for i, (h, w) in enumerate(hw):
        if i in decoded:
            image = decoded[i]
            # shape read on the host (no sync); metadata and stream disagree: corrupt file
            failed[i] = image is None or tuple(image.shape) != (3, h, w)
            if failed[i] and replaced is None:
                found = "nothing (corrupt JPEG)" if image is None else tuple(image.shape)
                raise ValueError(f"sample {i}: decoded {found}, metadata says (3, {h}, {w})")
        else:  # raw pixels, packed h*w*3 (rare: images stored uncompressed)
            image = stored[i, :h * w * 3].to(device, non_blocking=True).view(h, w, 3)
            image = image.permute(2, 0, 1)
        planes.append(image)
    sizes = meta.sizes
    if failed.any():
        sizes = sizes.clone()
        for bad, donor in replacement_pairs(failed):
            planes[bad], sizes[bad] = planes[donor], sizes[donor]
            replaced.append((bad, donor))
    return from_planes(planes, sizes, height, width)


def decode_canvas(stored: torch.Tensor, info: torch.Tensor, height: int, width: int,
                  device: torch.device | str) -> torch.Tensor:
    """As decode_images, as a canvas [B, height, width, 3] (each image at the top-left, zeros
    elsewhere): for the val transform and for comparisons."""
    return decode_images(stored, info, height, width, device).to_canvas()
