"""The device stage's dispatcher: decoded images -> MultiCropBatch, through the plain-torch
spec (pipelines/stage/torch_spec.py, the CPU path) or the fused Triton kernels
(pipelines/stage/triton_multicrop.py), which make the same draws from the same table."""
from __future__ import annotations

import importlib.util
import os

import torch

from pipelines.batch import MultiCropBatch
from pipelines.spec import CropSpec, MultiCropSpec
from pipelines.stage import draws as D
from pipelines.stage.handoff import DeviceImages, from_canvas
from pipelines.stage.torch_spec import (
    blur_radius,
    canvas_to_float,
    crop_resize,
    normalize,
    params_from_table,
    photometric,
)

IMPLS = ("torch", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The stage's impl, already resolved by the caller (trex_fast.plan: RunPlan.stage_impl,
    from trex_fast.availability.kernel_impl, so that it falls back with the loss). "triton" off
    CUDA runs only in Triton's interpreter (TRITON_INTERPRET=1, as the tests do)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS} (\"auto\" is resolved by "
                         "trex_fast.availability.kernel_impl before the stage is built)")
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("impl='triton' needs triton installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' on {device} runs only with TRITON_INTERPRET=1; "
                             "use impl='torch' off CUDA")
    return impl


class GpuMultiCrop:
    """Decoded images -> MultiCropBatch, on the device: RECIPE.md's 1 + 8 crops and their
    augmentations. Same (seed, rank, epoch, step) and inputs -> same batch; ranks differ.

    impl: "torch" (the spec, torch_spec.py; the CPU path) or "triton" (the fused kernels,
    triton_multicrop.py: 7 launches per batch); the caller resolves "auto" (resolve_impl).
    """

    def __init__(self, spec: MultiCropSpec, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, seed: int, rank: int = 0, impl: str = "torch"):
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self.channels_last, self.seed, self.rank = channels_last, seed, rank
        self.impl = resolve_impl(impl, self.device)
        for group in spec.groups:
            if group.count and group.blur_p > 0 and blur_radius(group) >= group.size:
                raise ValueError(f"blur radius {blur_radius(group)} needs crops larger than "
                                 f"{blur_radius(group)} pixels, got {group.size}")

    def __call__(self, images: torch.Tensor | DeviceImages, sizes: torch.Tensor | None,
                 labels: torch.Tensor, epoch: int, step: int) -> MultiCropBatch:
        """images: a uint8 canvas [B, H, W, 3] with sizes [B, 2] (height, width), or a
        DeviceImages (which carries its sizes; `sizes` is then ignored)."""
        if not isinstance(images, DeviceImages):
            images = from_canvas(images.to(self.device, non_blocking=True), sizes)
        gen = D.make_generator(self.device, self.seed, self.rank, epoch, step)
        b = images.batch_size
        uniforms = D.draw_uniforms(b * sum(g.count for g in self.spec.groups), gen)  # [9B, U]
        floats = canvas_to_float(images.to_canvas()) if self.impl == "torch" else None
        crops, row = [], 0
        for group in self.spec.groups:
            u = uniforms[row:row + group.count * b]  # this group's rows, crop-major
            row += group.count * b
            if group.count == 0:
                crops.append(torch.empty(0, 3, group.size, group.size, device=self.device,
                                         dtype=self.dtype))
            elif self.impl == "triton":
                from pipelines.stage import triton_multicrop as multicrop

                crops.append(multicrop.multicrop_group(images, u, group, self.dtype,
                                                       self.channels_last))
            else:
                crops.append(self._torch_group(floats, images.sizes, u, group))
        return MultiCropBatch(crops[0], crops[1],
                              labels.to(self.device, non_blocking=True).long())

    def _torch_group(self, floats: torch.Tensor, sizes: torch.Tensor, u: torch.Tensor,
                     group: CropSpec) -> torch.Tensor:
        boxes, params = params_from_table(D.params_table(u, sizes, group))
        crops = crop_resize(floats, boxes, group.size, params.flip)
        return normalize(photometric(crops, group, params), self.dtype, self.channels_last)
