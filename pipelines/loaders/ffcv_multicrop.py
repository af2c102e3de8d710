"""FFCV loader for the multi-crop recipe: read each image once on the CPU, decode it once (on
the CPU, or on the device), the rest on the device (pipelines/stage/). Imports ffcv; nothing
in trex_fast does.

Per batch, FFCV's numba-compiled, nogil, parallel-over-the-batch operations
(pipelines/loaders/ffcv_ops.py) fill one uint8 slot per sample and a metadata table
(pipelines.stage.handoff.META_COLUMNS); no per-sample Python runs. What the slot holds and how a
batch reaches the stage is the decode strategy, chosen once at construction
(pipelines/loaders/ffcv_decode.py): decode="cpu" decodes into packed slots with libjpeg-turbo,
decode="gpu" (issue 9) hands the stored bytes to one batched decode_jpeg on the device.

Data order: the reference's EpochSampler (a seeded permutation per epoch, split across ranks,
whole batches only, resumable mid-epoch) through ffcv_ops.EpochLoader, so the FFCV and
reference paths see the same order when the .beton holds the images in ImageFolder order
(tools/convert_in1k.py --train_order=source; the default writes train in a seeded random order).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.reader import Reader

from pipelines.batch import EpochSampler, LoaderSettings, MultiCropBatch
from pipelines.convert.beton import check_beton
from pipelines.loaders.ffcv_decode import decode_strategy
from pipelines.loaders.ffcv_ops import IMAGE_FIELD, LABEL_FIELD, SIZE_OUTPUT, EpochLoader
from pipelines.spec import MultiCropSpec, val_resize_size
from pipelines.stage.dispatch import GpuMultiCrop
from pipelines.stage.handoff import SampleMeta
from pipelines.stage.overlap import overlapped
from pipelines.stage.torch_spec import normalize, val_resize_center_crop


def _check_beton(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such .beton file (make one with "
                                "tools/convert_in1k.py)")
    check_beton(path)  # a cut file is named here, not deep inside FFCV's reader


def _pipelines(strategy) -> dict:
    # explicit decoders: FFCV would otherwise prepend the field's default decoder
    decoder, meta_op = strategy.ops()
    return {IMAGE_FIELD: PipelineSpec(IMAGE_FIELD, decoder=decoder),
            LABEL_FIELD: PipelineSpec(LABEL_FIELD, decoder=IntDecoder()),
            SIZE_OUTPUT: PipelineSpec(IMAGE_FIELD, decoder=meta_op)}


def _as_torch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FFCV's reused numpy buffers -> zero-copy tensors; valid until the next batch."""
    canvas, labels, meta = batch
    return (torch.from_numpy(canvas), torch.from_numpy(meta),
            torch.from_numpy(labels).view(-1).long())


def _drain(iterator) -> None:
    """An FFCV epoch iterator left mid-epoch can abort the process at exit: close it."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class FfcvTrainData:
    """Train batches as MultiCropBatch on the device, epoch by epoch (same interface as
    pipelines.loaders.reference.ReferenceTrainData). `decode`: "cpu" or "gpu"
    (ffcv_decode.DECODE_MODES); `max_size`: the slot's (H, W) if not the file's largest
    image."""

    def __init__(self, beton: str, spec: MultiCropSpec, settings: LoaderSettings,
                 max_size: tuple[int, int] | None = None, decode: str = "cpu"):
        _check_beton(beton)
        reader = Reader(beton)
        self.strategy = decode_strategy(decode, reader, max_size)
        self.settings = settings
        self.sampler = EpochSampler(int(reader.num_samples), settings.batch_size, settings.seed,
                                    settings.rank, settings.world_size)
        self.loader = EpochLoader(beton, self.sampler, batch_size=settings.batch_size,
                                  num_workers=max(1, settings.num_workers),
                                  pipelines=_pipelines(self.strategy), drop_last=True,
                                  batches_ahead=2)
        self.stage = GpuMultiCrop(spec, settings.device, settings.dtype,
                                  settings.channels_last, settings.seed, rank=settings.rank,
                                  impl=settings.stage_impl)
        self.corrupt_images = 0  # of the current epoch (see decoded)

    @property
    def decode(self) -> str:
        return self.strategy.name

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        return self.strategy.canvas_shape

    @property
    def host_to_device(self):
        """decode="cpu": the epoch's PinnedPrefixCopy (`last_bytes`, `total_bytes`)."""
        return self.strategy.host_to_device

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def decoded(self, epoch: int, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The CPU side alone: (packed [B, Hmax*Wmax*3 + 1] uint8, meta [B, 2], labels [B]);
        with decode="gpu": (stored bytes [B, slot] uint8, meta [B, 4], labels [B]); meta's
        columns are pipelines.stage.handoff.META_COLUMNS. A JPEG that fails to decode on the
        host (decode="cpu") is replaced by another sample of the batch and counted in
        `self.corrupt_images` (this epoch's count, a host int: no sync)."""
        self.corrupt_images = 0
        iterator = self.loader.epoch_iterator(epoch, start_step)
        try:
            for batch in iterator:
                data, meta, labels = _as_torch(batch)
                self.corrupt_images += self.strategy.on_host(data, meta, labels)
                yield data, meta, labels
        finally:
            _drain(iterator)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MultiCropBatch]:
        """Batch k+1's device work (host-to-device copy or decode hand-off, then the stage) is
        issued on a side CUDA stream before batch k is yielded (pipelines/stage/overlap.py). With
        decode="cpu" only the used prefix of each packed row travels, through pinned staging;
        `self.host_to_device.last_bytes` counts the bytes of the last batch."""
        device = self.settings.device
        self.strategy.start_epoch(device)

        def to_device(item):
            step, (data, meta, labels) = item
            meta, labels = meta.clone(), labels.clone()  # FFCV reuses these host buffers
            images, replaced = self.strategy.to_images(data, meta, labels, device)
            self.corrupt_images += replaced
            return self.stage(images, None, labels, epoch, step)

        decoded = self.decoded(epoch, start_step)
        try:
            yield from overlapped(enumerate(decoded, start=start_step), to_device, device)
        finally:
            decoded.close()  # an early stop drains the FFCV iterator now, not at collection


class FfcvValData:
    """Val images from val.beton: Resize(val size, bilinear) + CenterCrop on the device,
    sharded across ranks without padding; yields (normalised images, labels)."""

    def __init__(self, beton: str, global_size: int, settings: LoaderSettings,
                 decode: str = "cpu"):
        _check_beton(beton)
        reader = Reader(beton)
        self.strategy = decode_strategy(decode, reader)
        self.settings, self.global_size = settings, global_size
        self.num_images = int(reader.num_samples)  # numpy uint64 would make floats
        shard = np.arange(settings.rank, self.num_images, settings.world_size)
        self.loader = Loader(beton, batch_size=settings.batch_size,
                             num_workers=max(1, settings.num_workers),
                             order=OrderOption.SEQUENTIAL, indices=shard,
                             pipelines=_pipelines(self.strategy), drop_last=False,
                             batches_ahead=2)

    @property
    def decode(self) -> str:
        return self.strategy.name

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.settings
        self.corrupt_images = 0
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                data, meta, labels = _as_torch(batch)
                self.corrupt_images += self.strategy.on_host(data, meta, labels)
                canvas = self.strategy.to_canvas(data, meta, s.device)
                images = val_resize_center_crop(canvas, SampleMeta(meta).sizes,
                                                val_resize_size(self.global_size),
                                                self.global_size)
                yield (normalize(images, s.dtype, s.channels_last),
                       labels.to(s.device, non_blocking=True))
        finally:
            _drain(iterator)
