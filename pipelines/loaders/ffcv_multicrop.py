"""FFCV loader for the multi-crop recipe: read + decode each image once on CPU, the rest on
the device (pipelines/stage/torch_spec.py). Imports ffcv; nothing else in trex_fast does.

CPU side, per batch, in FFCV's numba-compiled, nogil, parallel-over-the-batch code:
- `CanvasDecoder` decodes each JPEG once with libjpeg-turbo (raw images are copied) straight
  into a fixed-size uint8 slot of Hmax*Wmax*3 bytes, packed (row stride = its own width), so
  no copy follows the decode (Hmax/Wmax: the largest image of the .beton, from its metadata,
  so nothing is resized or clipped). The device stage reads the packed rows in place
  (pipelines/device_images.from_packed; no canvas is made);
- `ImageSizeDecoder`, a second pipeline on the same field, reads only the metadata: the true
  (height, width) of each image, so the device stage knows where each canvas ends.
Reading and decoding are the only per-image CPU work; no per-sample Python runs.

decode="gpu" (issue 9) moves the decode off the CPU: `BytesPassthrough` only copies each
sample's stored bytes (JPEG or raw pixels) into a fixed-size slot and `SampleInfoDecoder`
adds (height, width, nbytes, is_jpeg); pipelines/gpu_decode.decode_images then decodes the
batch's JPEGs in one torchvision.io.decode_jpeg call on the device (nvJPEG on CUDA) and hands
the decoded planes, concatenated once, to the stage. decode="cpu" is the path above.

Data order: the reference's EpochSampler (a seeded permutation per epoch, split across ranks,
whole batches only, resumable mid-epoch), so the FFCV and reference paths see the same order
when the .beton holds the images in ImageFolder order (tools/convert_in1k.py
--train_order=source; the default writes train in a seeded random order).
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

from pipelines.batch import EpochSampler, LoaderSettings, MultiCropBatch, replacement_pairs
from pipelines.convert.beton import check_beton
from pipelines.spec import MultiCropSpec, val_resize_size
from pipelines.stage.dispatch import GpuMultiCrop
from pipelines.stage.gpu_decode import decode_images
from pipelines.stage.handoff import DeviceImages, from_packed
from pipelines.stage.overlap import PinnedPrefixCopy, overlapped, packed_prefix_bytes
from pipelines.stage.torch_spec import normalize, val_resize_center_crop

IMAGE_FIELD, LABEL_FIELD, SIZE_OUTPUT = "image", "label", "image_size"
DECODE_MODES = ("cpu", "gpu")


def _per_sample(previous_state: State, n: int, dtype: str) -> tuple[State, AllocationQuery]:
    """The new state and the allocation of n values of dtype per sample (a uint8 slot of
    decoded pixels or stored bytes, or int32 metadata columns)."""
    dt = np.dtype(dtype)
    return replace(previous_state, jit_mode=True, shape=(n,), dtype=dt), AllocationQuery((n,), dt)



class CanvasDecoder(Operation):
    """JPEG/raw -> a packed uint8 slot of Hmax*Wmax*3 bytes per image, decoded once, plus one
    status byte at the end of the slot: 1 where libjpeg-turbo failed (a corrupt or truncated
    JPEG: the slot then holds stale or partial pixels), 0 otherwise. The host reads it with
    the batch (replace_corrupt): no device sync, no per-sample Python unless one failed."""

    def __init__(self, max_size: tuple[int, int] | None = None):
        super().__init__()
        self.max_size = max_size  # (Hmax, Wmax); None: the largest image in the file

    def declare_state_and_memory(self, previous_state: State):
        hmax, wmax = _canvas_size(self.metadata, self.max_size)
        self.canvas_shape = (hmax, wmax, 3)
        return _per_sample(previous_state, hmax * wmax * 3 + 1, "<u1")  # + the status byte

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
                status = 0
                if field["mode"] == jpg:  # libffcv's imdecode: tjDecompress2's 0 or -1
                    status = imdecode_c(data, packed, h, w, h, w, 0, 0, 1, 1, False, False)
                else:
                    memcpy_c(data, packed)
                destination[i][-1] = 1 if status != 0 else 0
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class ImageSizeDecoder(Operation):
    """The (height, width) of each image, from the metadata alone (no read, no decode)."""

    def declare_state_and_memory(self, previous_state: State):
        return _per_sample(previous_state, 2, "<i4")

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


class BytesPassthrough(Operation):
    """Stored bytes -> a uint8 slot per sample, no decode (decode="gpu"): the JPEG stream, or
    the raw pixels (already packed h*w*3). The slot holds Hmax*Wmax*3 bytes or the largest
    stored sample, whichever is larger (a tiny image's JPEG headers outweigh its pixels)."""

    def __init__(self, max_bytes: int, max_size: tuple[int, int] | None = None):
        super().__init__()
        self.max_bytes = int(max_bytes)  # the largest stored sample of the field
        self.max_size = max_size

    def declare_state_and_memory(self, previous_state: State):
        hmax, wmax = _canvas_size(self.metadata, self.max_size)
        self.canvas_shape = (hmax, wmax, 3)
        return _per_sample(previous_state, max(hmax * wmax * 3, self.max_bytes), "<u1")

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        memcpy_c = Compiler.compile(memcpy)

        def passthrough(batch_indices, destination, metadata, storage_state):
            for i in my_range(len(batch_indices)):
                data = mem_read(metadata[batch_indices[i]]["data_ptr"], storage_state)
                memcpy_c(data, destination[i][:len(data)])
            return destination[:len(batch_indices)]

        passthrough.is_parallel = True
        return passthrough


class SampleInfoDecoder(Operation):
    """(height, width, nbytes, is_jpeg) of each sample (pipelines.stage.gpu_decode's INFO_*):
    metadata plus the stored length, which the device decode needs to cut the slot."""

    def declare_state_and_memory(self, previous_state: State):
        return _per_sample(previous_state, 4, "<i4")

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        jpg = IMAGE_MODES["jpg"]

        def info(batch_indices, destination, metadata, storage_state):
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                destination[i, 0] = field["height"]
                destination[i, 1] = field["width"]
                # a pointer lookup into the mapped file: no bytes are copied here
                destination[i, 2] = len(mem_read(field["data_ptr"], storage_state))
                destination[i, 3] = 1 if field["mode"] == jpg else 0
            return destination[:len(batch_indices)]

        info.is_parallel = True
        return info


def _canvas_size(metadata, max_size: tuple[int, int] | None) -> tuple[int, int]:
    hmax, wmax = int(metadata["height"].max()), int(metadata["width"].max())
    if max_size is not None:
        if max_size[0] < hmax or max_size[1] < wmax:
            raise ValueError(f"max_size={max_size} is smaller than the largest image "
                             f"in the file ({hmax}x{wmax})")
        hmax, wmax = max_size
    return hmax, wmax


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
    check_beton(path)  # a cut file is named here, not deep inside FFCV's reader


def _check_decode(decode: str) -> None:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: accepted values are {', '.join(DECODE_MODES)}")


def _max_stored_bytes(reader: Reader) -> int:
    """The largest stored image (the allocation table's size of each image's data_ptr)."""
    pointers = reader.metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]["data_ptr"]
    table = reader.alloc_table
    return int(table["size"][np.isin(table["ptr"], pointers)].max())


def _image_ops(decode: str, reader: Reader, max_size: tuple[int, int] | None = None
               ) -> tuple[Operation, Operation]:
    """(image op, per-sample size/info op) for the decode mode."""
    if decode == "gpu":
        return BytesPassthrough(_max_stored_bytes(reader), max_size), SampleInfoDecoder()
    return CanvasDecoder(max_size), ImageSizeDecoder()


def _pipelines(decoder: Operation, size_op: Operation) -> dict:
    # explicit decoders: FFCV would otherwise prepend the field's default decoder
    return {IMAGE_FIELD: PipelineSpec(IMAGE_FIELD, decoder=decoder),
            LABEL_FIELD: PipelineSpec(LABEL_FIELD, decoder=IntDecoder()),
            SIZE_OUTPUT: PipelineSpec(IMAGE_FIELD, decoder=size_op)}


def _to_images(decode: str, data: torch.Tensor, sizes: torch.Tensor,
               canvas_shape: tuple[int, int, int], device: torch.device,
               replaced: list | None = None) -> DeviceImages:
    """The loader's (bytes or packed decodes, sizes or info) -> the images on the device, in
    the layout the stage reads in place (packed rows, or decoded planes). decode="gpu": see
    gpu_decode.decode_images for `replaced` (the JPEGs that failed to decode)."""
    height, width, _ = canvas_shape
    if decode == "gpu":
        return decode_images(data, sizes, height, width, device, replaced)
    return from_packed(data.to(device, non_blocking=True), sizes[:, :2], height, width)


def _to_canvas(decode: str, data: torch.Tensor, sizes: torch.Tensor,
               canvas_shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """As _to_images, as a [B, H, W, 3] canvas (the val transform reads canvases)."""
    return _to_images(decode, data, sizes, canvas_shape, device).to_canvas()


def _as_torch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FFCV's reused numpy buffers -> zero-copy tensors; valid until the next batch."""
    canvas, labels, sizes = batch
    return (torch.from_numpy(canvas), torch.from_numpy(sizes),
            torch.from_numpy(labels).view(-1).long())


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


def _drain(iterator) -> None:
    """An FFCV epoch iterator left mid-epoch can abort the process at exit: close it."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class FfcvTrainData:
    """Train batches as MultiCropBatch on the device, epoch by epoch (same interface as
    pipelines.loaders.reference.ReferenceTrainData)."""

    def __init__(self, beton: str, spec: MultiCropSpec, settings: LoaderSettings,
                 max_size: tuple[int, int] | None = None, decode: str = "cpu"):
        _check_beton(beton)
        _check_decode(decode)
        self.settings, self.decode = settings, decode
        self.decoder, size_op = _image_ops(decode, Reader(beton), max_size)
        self.loader = Loader(beton, batch_size=settings.batch_size,
                             num_workers=max(1, settings.num_workers),
                             order=OrderOption.SEQUENTIAL,
                             pipelines=_pipelines(self.decoder, size_op),
                             drop_last=True, batches_ahead=2)
        n = int(self.loader.reader.num_samples)
        self.sampler = EpochSampler(n, settings.batch_size, settings.seed, settings.rank,
                                    settings.world_size)
        # FFCV only takes built-in orders by name; ours replaces the sequential one
        self.loader.traversal_order = EpochOrder(self.loader, self.sampler)
        self.loader.first_traversal_order = self.loader.next_traversal_order()
        self.stage = GpuMultiCrop(spec, settings.device, settings.dtype,
                                  settings.channels_last, settings.seed, rank=settings.rank,
                                  impl=settings.stage_impl)
        self.corrupt_images = 0  # of the current epoch (see decoded)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def decoded(self, epoch: int, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The CPU side alone: (packed [B, Hmax*Wmax*3] uint8, sizes [B, 2], labels [B]);
        with decode="gpu": (stored bytes [B, slot] uint8, info [B, 4], labels [B]).
        A JPEG that fails to decode (decode="cpu") is replaced by another sample of the batch
        and counted in `self.corrupt_images` (this epoch's count, a host int: no sync)."""
        self.sampler.set_epoch(epoch, start_step)
        self.loader.next_epoch = epoch
        self.corrupt_images = 0
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                data, sizes, labels = _as_torch(batch)
                if self.decode == "cpu":  # the decoder's status byte, already on the host
                    self.corrupt_images += replace_corrupt(data, sizes, labels,
                                                           data[:, -1].numpy())
                yield data, sizes, labels
        finally:
            _drain(iterator)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MultiCropBatch]:
        """Batch k+1's device work (host-to-device copy or decode hand-off, then the stage) is
        issued on a side CUDA stream before batch k is yielded (pipelines/stage/overlap.py). With
        decode="cpu" only the used prefix of each packed row travels, through pinned staging;
        `self.host_to_device.last_bytes` counts the bytes of the last batch."""
        device = self.settings.device
        self.host_to_device = PinnedPrefixCopy(device)

        def to_device(item):
            step, (data, sizes, labels) = item
            sizes, labels = sizes.clone(), labels.clone()  # FFCV reuses these host buffers
            if self.decode == "cpu":
                data = self.host_to_device(data, packed_prefix_bytes(sizes))
            replaced = []  # decode="gpu": JPEGs the device decode failed on (decoded() did cpu)
            images = _to_images(self.decode, data, sizes, self.canvas_shape, device, replaced)
            for bad, donor in replaced:
                labels[bad] = labels[donor]
            self.corrupt_images += len(replaced)
            return self.stage(images, None, labels, epoch, step)

        decoded = self.decoded(epoch, start_step)
        try:
            yield from overlapped(enumerate(decoded, start=start_step), to_device, device)
        finally:
            decoded.close()  # an early stop drains the FFCV iterator now, not at collection

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        return self.decoder.canvas_shape


class FfcvValData:
    """Val images from val.beton: Resize(val size, bilinear) + CenterCrop on the device,
    sharded across ranks without padding; yields (normalised images, labels)."""

    def __init__(self, beton: str, global_size: int, settings: LoaderSettings,
                 decode: str = "cpu"):
        _check_beton(beton)
        _check_decode(decode)
        self.settings, self.global_size, self.decode = settings, global_size, decode
        reader = Reader(beton)
        self.num_images = int(reader.num_samples)  # numpy uint64 would make floats
        shard = np.arange(settings.rank, self.num_images, settings.world_size)
        self.decoder, size_op = _image_ops(decode, reader)
        self.loader = Loader(beton, batch_size=settings.batch_size,
                             num_workers=max(1, settings.num_workers),
                             order=OrderOption.SEQUENTIAL, indices=shard,
                             pipelines=_pipelines(self.decoder, size_op), drop_last=False,
                             batches_ahead=2)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.settings
        self.corrupt_images = 0
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                data, sizes, labels = _as_torch(batch)
                if self.decode == "cpu":
                    self.corrupt_images += replace_corrupt(data, sizes, labels,
                                                           data[:, -1].numpy())
                canvas = _to_canvas(self.decode, data, sizes, self.decoder.canvas_shape,
                                    s.device)
                sizes = sizes[:, :2]  # gpu mode's info: (height, width) first
                images = val_resize_center_crop(canvas, sizes,
                                                val_resize_size(self.global_size),
                                                self.global_size)
                yield (normalize(images, s.dtype, s.channels_last),
                       labels.to(s.device, non_blocking=True))
        finally:
            _drain(iterator)
