"""FFCV's side of the FFCV loader (pipelines/loaders/ffcv_multicrop.py): the numba-compiled
per-batch operations that read each sample's stored image once, and the Loader subclass that
draws its order from our EpochSampler. Imports ffcv.

- `CanvasDecoder` (decode="cpu") decodes each JPEG once with libjpeg-turbo (raw images are
  copied) straight into a fixed-size uint8 slot of Hmax*Wmax*3 bytes, packed (row stride = its
  own width), so no copy follows the decode; `ImageSizeDecoder`, a second pipeline on the same
  field, reads only the metadata: the true (height, width) of each image.
- `BytesPassthrough` (decode="gpu") copies each sample's stored bytes unchanged into a slot and
  `SampleInfoDecoder` adds (height, width, nbytes, is_jpeg), for the device decode.
Both metadata ops write the columns of pipelines.stage.handoff.META_COLUMNS, by name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, memcpy
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

from pipelines.batch import EpochSampler
from pipelines.stage.handoff import HEIGHT, IS_JPEG, META_COLUMNS, NBYTES, WIDTH

IMAGE_FIELD, LABEL_FIELD, SIZE_OUTPUT = "image", "label", "image_size"
STATUS_BYTE = -1  # CanvasDecoder's slot ends on one status byte: 1 where the decode failed


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
        hmax, wmax = canvas_size(self.metadata, self.max_size)
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
                destination[i][STATUS_BYTE] = 1 if status != 0 else 0
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class ImageSizeDecoder(Operation):
    """The (height, width) of each image, from the metadata alone (no read, no decode): the
    first columns of pipelines.stage.handoff.META_COLUMNS."""

    def declare_state_and_memory(self, previous_state: State):
        return _per_sample(previous_state, WIDTH + 1, "<i4")

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()

        def sizes(batch_indices, destination, metadata, storage_state):
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                destination[i, HEIGHT] = field["height"]
                destination[i, WIDTH] = field["width"]
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
        hmax, wmax = canvas_size(self.metadata, self.max_size)
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
    """(height, width, nbytes, is_jpeg) of each sample (pipelines.stage.handoff.META_COLUMNS):
    metadata plus the stored length, which the device decode needs to cut the slot."""

    def declare_state_and_memory(self, previous_state: State):
        return _per_sample(previous_state, len(META_COLUMNS), "<i4")

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        jpg = IMAGE_MODES["jpg"]

        def info(batch_indices, destination, metadata, storage_state):
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                destination[i, HEIGHT] = field["height"]
                destination[i, WIDTH] = field["width"]
                # a pointer lookup into the mapped file: no bytes are copied here
                destination[i, NBYTES] = len(mem_read(field["data_ptr"], storage_state))
                destination[i, IS_JPEG] = 1 if field["mode"] == jpg else 0
            return destination[:len(batch_indices)]

        info.is_parallel = True
        return info


def canvas_size(metadata, max_size: tuple[int, int] | None) -> tuple[int, int]:
    """(Hmax, Wmax) of an image field's slots: the largest image of the file (its metadata),
    or `max_size`, which must hold it."""
    hmax, wmax = int(metadata["height"].max()), int(metadata["width"].max())
    if max_size is not None:
        if max_size[0] < hmax or max_size[1] < wmax:
            raise ValueError(f"max_size={max_size} is smaller than the largest image "
                             f"in the file ({hmax}x{wmax})")
        hmax, wmax = max_size
    return hmax, wmax


def decode_failed(packed: torch.Tensor) -> np.ndarray:
    """CanvasDecoder's status bytes of a batch ([B, slot] on the host): true where libjpeg-turbo
    failed on that sample's JPEG."""
    return packed[:, STATUS_BYTE].numpy()


def image_metadata(reader: Reader):
    """The image field's per-sample metadata (height, width, mode, data_ptr) of a .beton."""
    return reader.metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]


def max_stored_bytes(reader: Reader) -> int:
    """The largest stored image (the allocation table's size of each image's data_ptr)."""
    table = reader.alloc_table
    pointers = image_metadata(reader)["data_ptr"]
    return int(table["size"][np.isin(table["ptr"], pointers)].max())


class EpochOrder(TraversalOrder):
    """FFCV traversal order backed by the reference EpochSampler (per-epoch seed, ranks)."""

    def __init__(self, loader: Loader, sampler: EpochSampler):
        super().__init__(loader)
        self.sampler = sampler

    def sample_order(self, epoch: int) -> np.ndarray:
        self.sampler.epoch = epoch
        return np.fromiter((index for _, index in self.sampler), dtype=np.int64)


class EpochLoader(Loader):
    """An FFCV Loader whose data order is our EpochSampler's, the one place that sets FFCV's
    internals. Why: FFCV's own orders (sequential, a seeded shuffle) cannot start mid-epoch nor
    split the data as the reference pipeline does; the EpochSampler gives the reference's order,
    its split across ranks (whole batches only) and an exact mid-epoch resume. FFCV takes only
    its built-in orders by name, so the sequential one it builds is replaced here:
    `traversal_order` (asked for each epoch's order by __iter__), `first_traversal_order` (what
    __len__ counts) and `next_epoch` (the epoch __iter__ asks the order for)."""

    def __init__(self, path: str, sampler: EpochSampler, **loader_args):
        super().__init__(path, order=OrderOption.SEQUENTIAL, **loader_args)
        self.sampler = sampler
        self.traversal_order = EpochOrder(self, sampler)
        self.first_traversal_order = self.next_traversal_order()

    def epoch_iterator(self, epoch: int, start_step: int = 0):
        """FFCV's iterator over steps start_step.. of `epoch` (the sampler skips the rest)."""
        self.sampler.set_epoch(epoch, start_step)
        self.next_epoch = epoch
        return iter(self)
