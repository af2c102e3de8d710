"""Batched JPEG decode on the training device, for the FFCV loader's decode="gpu" mode.

The FFCV side (pipelines/ffcv_multicrop.BytesPassthrough) hands out each sample's stored bytes
unchanged: a JPEG, or raw pixels packed h*w*3 (row stride w). Here the whole batch's JPEGs go
through one torchvision.io.decode_jpeg call (nvJPEG, batched, on CUDA; libjpeg on CPU, which
is what the tests run), raw samples are unpacked as they are, and both land in the
[B, Hmax, Wmax, 3] canvas GpuMultiCrop reads. Imports no ffcv.
"""
from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.gpu_multicrop import unpack_canvas

# columns of the per-sample info the FFCV side writes next to the bytes
INFO_HEIGHT, INFO_WIDTH, INFO_NBYTES, INFO_IS_JPEG = range(4)


def decode_canvas(stored: torch.Tensor, info: torch.Tensor, height: int, width: int,
                  device: torch.device | str) -> torch.Tensor:
    """stored [B, slot] uint8 on the CPU (sample b's bytes first), info [B, 4] int on the CPU
    (height, width, nbytes, is_jpeg) -> canvas uint8 [B, height, width, 3] on `device`, each
    image at the top-left and zeros elsewhere (the layout unpack_canvas makes)."""
    if stored.dtype != torch.uint8 or stored.ndim != 2 or stored.device.type != "cpu":
        raise ValueError(f"stored must be CPU uint8 [B, slot], got {stored.dtype} "
                         f"{tuple(stored.shape)} on {stored.device}")
    if info.ndim != 2 or info.shape != (stored.shape[0], 4):
        raise ValueError(f"info must be [B, 4] (height, width, nbytes, is_jpeg), got "
                         f"{tuple(info.shape)}")
    device = torch.device(device)
    b = stored.shape[0]
    sizes = info[:, :2].long()
    is_jpeg = info[:, INFO_IS_JPEG] != 0
    canvas = torch.zeros(b, height, width, 3, dtype=torch.uint8, device=device)
    raw = (~is_jpeg).nonzero().view(-1)
    if len(raw):  # raw bytes already are the packed layout: only those rows travel
        canvas[raw.to(device)] = unpack_canvas(stored[raw].to(device, non_blocking=True),
                                               sizes[raw], height, width)
    jpeg = is_jpeg.nonzero().view(-1).tolist()  # CPU tensors: no device sync
    if jpeg:
        nbytes = info[:, INFO_NBYTES].tolist()
        # views, no copy: decode_jpeg wants one 1-D CPU tensor per image
        images = decode_jpeg([stored[i, :nbytes[i]] for i in jpeg], device=device,
                             mode=ImageReadMode.RGB)
        hw = sizes.tolist()
        for i, image in zip(jpeg, images):
            h, w = hw[i]
            if tuple(image.shape) != (3, h, w):  # metadata and stream disagree: corrupt file
                raise ValueError(f"sample {i}: decoded {tuple(image.shape)}, metadata says "
                                 f"(3, {h}, {w})")
            canvas[i, :h, :w] = image.permute(1, 2, 0)
    return canvas
