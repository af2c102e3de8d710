"""FFCV loader for the multi-crop recipe: read + decode each image once on CPU, the rest on
the device (pipelines/gpu_multicrop.py). Imports ffcv; nothing else in trex_fast does.

CPU side, per batch, in FFCV's numba-compiled, nogil, parallel-over-the-batch code:
- `CanvasDecoder` decodes each JPEG once with libjpeg-turbo (raw images are copied) straight
  into a fixed-size uint8 slot of Hmax*Wmax*3 bytes, packed (row stride = its own width), so
  no copy follows the decode (Hmax/Wmax: the largest image of the .beton, from its metadata,
  so nothing is resized or clipped). The device stage unpacks it into a [Hmax, Wmax, 3]
  canvas with one gather (gpu_multicrop.unpack_canvas);
- `ImageSizeDecoder`, a second pipeline on the same field, reads only the metadata: the true
  (height, width) of each image, so the device stage knows where each canvas ends.
Reading and decoding are the only per-image CPU work; no per-sample Python runs.

Data order: the reference's EpochSampler (a seeded permutation per epoch, split across ranks,
whole batches only, resumable mid-epoch), so the FFCV and reference paths see the same order
when the .beton holds the images in ImageFolder order (tools/convert_in1k.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, memcpy
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

from pipelines.batch import MultiCropBatch
from pipelines.gpu_multicrop import GpuMultiCrop, normalize, unpack_canvas, val_resize_center_crop
from pipelines.reference import EpochSampler, LoaderSettings
from pipelines.spec import MultiCropSpec, val_resize_size

IMAGE_FIELD, LABEL_FIELD, SIZE_OUTPUT = "image", "label", "image_size"


class CanvasDecoder(Operation):
    """JPEG/raw -> a packed uint8 slot of Hmax*Wmax*3 bytes per image, decoded once."""

    def __init__(self, max_size: tuple[int, int] | None = None):
        super().__init__()
        self.max_size = max_size  # (Hmax, Wmax); None: the largest image in the file

    def declare_state_and_memory(self, previous_state: State):
        heights, widths = self.metadata["height"], self.metadata["width"]
        hmax, wmax = int(heights.max()), int(widths.max())
        if self.max_size is not None:
            if self.max_size[0] < hmax or self.max_size[1] < wmax:
                raise ValueError(f"max_size={self.max_size} is smaller than the largest image "
                                 f"in the file ({hmax}x{wmax})")
            hmax, wmax = self.max_size
        self.canvas_shape = (hmax, wmax, 3)
        slot = (hmax * wmax * 3,)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=slot, dtype=u8),
                AllocationQuery(slot, u8))

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        memcpy_c = Compiler.compile(memcpy)
        jpg = IMAGE_MODES["jpg"]

        def decode(batch_indices, destination, metadata, storage_state):
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field["data_ptr"], storage_state)
                h, w = np.int64(field["height"]), np.int64(field["width"])
                packed = destination[i][:h * w * 3]
                if field["mode"] == jpg:
                    imdecode_c(data, packed, h, w, h, w, 0, 0, 1, 1, False, False)
                else:
                    memcpy_c(data, packed)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class ImageSizeDecoder(Operation):
    """The (height, width) of each image, from the metadata alone (no read, no decode)."""

    def declare_state_and_memory(self, previous_state: State):
        i32 = np.dtype("<i4")
        return (replace(previous_state, jit_mode=True, shape=(2,), dtype=i32),
                AllocationQuery((2,), i32))

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()

        def sizes(batch_indices, destination, metadata, storage_state):
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                destination[i, 0] = field["height"]
                destination[i, 1] = field["width"]
            return destination[:len(batch_indices)]

        sizes.is_parallel = True
        return sizes


class EpochOrder(TraversalOrder):
    """FFCV traversal order backed by the reference EpochSampler (per-epoch seed, ranks)."""

    def __init__(self, loader: Loader, sampler: EpochSampler):
        super().__init__(loader)
        self.sampler = sampler

    def sample_order(self, epoch: int) -> np.ndarray:
        self.sampler.epoch = epoch
        return np.fromiter((index for _, index in self.sampler), dtype=np.int64)


def _check_beton(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such .beton file (make one with "
                                "tools/convert_in1k.py)")


def _pipelines(decoder: CanvasDecoder) -> dict:
    # explicit decoders: FFCV would otherwise prepend the field's default decoder
    return {IMAGE_FIELD: PipelineSpec(IMAGE_FIELD, decoder=decoder),
            LABEL_FIELD: PipelineSpec(LABEL_FIELD, decoder=IntDecoder()),
            SIZE_OUTPUT: PipelineSpec(IMAGE_FIELD, decoder=ImageSizeDecoder())}


def _as_torch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FFCV's reused numpy buffers -> zero-copy tensors; valid until the next batch."""
    canvas, labels, sizes = batch
    return (torch.from_numpy(canvas), torch.from_numpy(sizes),
            torch.from_numpy(labels).view(-1).long())


def _drain(iterator) -> None:
    """An FFCV epoch iterator left mid-epoch can abort the process at exit: close it."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class FfcvTrainData:
    """Train batches as MultiCropBatch on the device, epoch by epoch (same interface as
    pipelines.reference.ReferenceTrainData)."""

    def __init__(self, beton: str, spec: MultiCropSpec, settings: LoaderSettings,
                 max_size: tuple[int, int] | None = None):
        _check_beton(beton)
        self.settings = settings
        self.decoder = CanvasDecoder(max_size)
        self.loader = Loader(beton, batch_size=settings.batch_size,
                             num_workers=max(1, settings.num_workers),
                             order=OrderOption.SEQUENTIAL, pipelines=_pipelines(self.decoder),
                             drop_last=True, batches_ahead=2)
        n = int(self.loader.reader.num_samples)
        self.sampler = EpochSampler(n, settings.batch_size, settings.seed, settings.rank,
                                    settings.world_size)
        # FFCV only takes built-in orders by name; ours replaces the sequential one
        self.loader.traversal_order = EpochOrder(self.loader, self.sampler)
        self.loader.first_traversal_order = self.loader.next_traversal_order()
        reader = self.loader.reader  # metadata columns are named f0, f1... in field order
        labels = reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]
        self.labels_max = int(labels.max())
        self.stage = GpuMultiCrop(spec, settings.device, settings.dtype,
                                  settings.channels_last, settings.seed)

    @property
    def num_classes(self) -> int:
        return self.labels_max + 1

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def decoded(self, epoch: int, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The CPU side alone: (packed [B, Hmax*Wmax*3] uint8, sizes [B, 2], labels [B])."""
        self.sampler.set_epoch(epoch, start_step)
        self.loader.next_epoch = epoch
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                yield _as_torch(batch)
        finally:
            _drain(iterator)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MultiCropBatch]:
        height, width, _ = self.canvas_shape
        device = self.settings.device
        for step, (packed, sizes, labels) in enumerate(self.decoded(epoch, start_step),
                                                       start=start_step):
            canvas = unpack_canvas(packed.to(device, non_blocking=True), sizes, height, width)
            yield self.stage(canvas, sizes, labels, epoch, step)

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        return self.decoder.canvas_shape


class FfcvValData:
    """Val images from val.beton: Resize(val size, bilinear) + CenterCrop on the device,
    sharded across ranks without padding; yields (normalised images, labels)."""

    def __init__(self, beton: str, global_size: int, settings: LoaderSettings):
        _check_beton(beton)
        self.settings, self.global_size = settings, global_size
        self.num_images = int(Reader(beton).num_samples)  # numpy uint64 would make floats
        shard = np.arange(settings.rank, self.num_images, settings.world_size)
        self.decoder = CanvasDecoder()
        self.loader = Loader(beton, batch_size=settings.batch_size,
                             num_workers=max(1, settings.num_workers),
                             order=OrderOption.SEQUENTIAL, indices=shard,
                             pipelines=_pipelines(self.decoder), drop_last=False, batches_ahead=2)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.settings
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                packed, sizes, labels = _as_torch(batch)
                height, width, _ = self.decoder.canvas_shape
                canvas = unpack_canvas(packed.to(s.device), sizes, height, width)
                images = val_resize_center_crop(canvas, sizes,
                                                val_resize_size(self.global_size),
                                                self.global_size)
                yield (normalize(images, s.dtype, s.channels_last),
                       labels.to(s.device, non_blocking=True))
        finally:
            _drain(iterator)
