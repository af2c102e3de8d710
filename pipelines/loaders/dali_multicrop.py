"""DALI loader for the multi-crop recipe (issues #5, #13). Imports nvidia.dali; nothing else does.

Two graphs read the same tar shards (fn.readers.webdataset over the shards + wds2idx index
files written by tools/convert_in1k.py) and decode each image once:
- photometric="stage" (GPU mode's default; runs in CPU mode too, and the tests run it there):
  decode ("mixed" = nvJPEG on GPU, "cpu" in CPU mode), resize down to the stored maximum side
  where larger, pad to a fixed canvas [B, S, S, 3] uint8 (image at the top-left, zeros
  elsewhere) and output the true sizes [B, 2] (height, width). Canvas and sizes reach torch
  through DLPack without a copy and pipelines.stage.dispatch.GpuMultiCrop makes the 9 crops and
  their augmentations: the device stage the FFCV path uses, one implementation for both.
- photometric="numba" (CPU mode's default; CPU only): for each of the 1 + 8 crops of
  pipelines/spec.py, random_resized_crop, then the photometric stage (colour jitter with its
  four ops in a random order per sample, grayscale, blur, solarize) as one numba_function per
  crop fed by one uniform-draw op (pipelines/loaders/photometric_numba.py), then flip + normalise +
  cast in crop_mirror_normalize, HWC (so the torch view is channels-last for free).
No per-sample Python runs in either. The graphs live in pipelines/loaders/dali_graphs.py; the
choice between them is made once, at construction: a StageCrops or NumbaCrops object
(crop_strategy) builds the epoch's graph and turns its outputs into batches, and one DaliDevice
says where the graph runs. docs/DALI.md lists every parameter mapping and tolerance.

Data order: per epoch, the shard files are permuted and the reader's shuffle buffer reseeded,
both from (seed, epoch); rank r reads DALI shard r of num_shards = world size; every rank stops
after n // (batch * world) steps (drop policy, as the reference). Resume: the pipeline of an
epoch is rebuilt from the same seeds and its first start_step batches are drawn and dropped, so
a resumed run sees exactly the batches (order and augmentations) of an uninterrupted one; the
stage's draws depend on (seed, rank, epoch, step) only.
"""
from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from torch.utils.dlpack import from_dlpack

from pipelines.batch import LoaderSettings, MultiCropBatch, derived_seed, whole_steps
from pipelines.convert.options import ConvertOptions
from pipelines.convert.report import load_meta
from pipelines.convert.shards import check_shard
from pipelines.errors import BadFileError
from pipelines.loaders.dali_graphs import READER, canvas_graph, crops_graph, parse_labels, val_graph
from pipelines.spec import MultiCropSpec
from pipelines.stage.dispatch import GpuMultiCrop
from pipelines.stage.handoff import DeviceImages, from_canvas

PHOTOMETRIC_IMPLS = ("numba", "stage")  # see photometric_impl()


# ---------------------------------------------------------------- shards
def find_shards(folder: str) -> tuple[list[str], list[str], int]:
    """(tar paths, index paths, number of samples) of a dali/<split> folder, sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r}: no such folder; tools/convert_in1k.py "
                                "--formats=dali writes <data>/dali/train and <data>/dali/val")
    tars = sorted(glob.glob(os.path.join(folder, "*.tar")))
    if not tars:
        raise FileNotFoundError(f"{folder!r} holds no .tar shards")
    indexes = [tar[:-len(".tar")] + ".idx" for tar in tars]
    missing = [p for p in indexes if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) lack their DALI index file, e.g. "
                                f"{missing[0]!r} (rerun tools/convert_in1k.py)")
    total = 0
    for path in indexes:
        with open(path) as f:
            head = f.readline().split()
        if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
            raise BadFileError(f"{path}: not a DALI wds2idx index (first line {head})")
        total += int(head[1])
    for tar, index in zip(tars, indexes, strict=True):
        check_shard(tar, index)
    return tars, indexes, total


def canvas_side(folder: str, max_resolution: int | None = None) -> int:
    """The canvas side S of the stage graph: `max_resolution` if given, else the converter's
    max_resolution from <data>/meta.json (no stored image has a longer side), else the
    converter's default. Images with a longer side than S are resized down to it."""
    if max_resolution is None:
        data_root = Path(folder).parent.parent  # <data>/dali/<split>
        if (data_root / "meta.json").is_file():
            max_resolution = load_meta(data_root).get("options", {}).get("max_resolution")
    side = ConvertOptions.max_resolution if max_resolution is None else max_resolution
    if not isinstance(side, int) or isinstance(side, bool) or side < 1:
        raise ValueError(f"max_resolution={side!r}: expected a positive int (pixels)")
    return side

# ---------------------------------------------------------------- loaders
@dataclass(frozen=True)
class DaliDevice:
    """Where a DALI graph runs, decided once from the loader settings: CPU mode (device_id
    None, "cpu" decode) or GPU mode ("mixed" = nvJPEG decode, on device_id)."""

    gpu: bool
    device_id: int | None
    dtype: object  # DALI's output dtype: no bfloat16 in DALI, so fp16 then a cast on the device


def dali_device(settings: LoaderSettings) -> DaliDevice:
    gpu = settings.device.type == "cuda"
    dtype = types.FLOAT if settings.dtype == torch.float32 else types.FLOAT16
    device_id = (settings.device.index or torch.cuda.current_device()) if gpu else None
    return DaliDevice(gpu, device_id, dtype)


def photometric_impl(requested: str | None, gpu: bool) -> str:
    """Where the crops and their augmentations are made: "stage" (GpuMultiCrop after the
    canvas hand-off; the default in GPU mode) or "numba" (DALI crops + the numba operator; the
    default in CPU mode, CPU only: a CPU numba_function cannot take GPU images)."""
    choice = requested or ("stage" if gpu else "numba")
    if choice not in PHOTOMETRIC_IMPLS:
        raise ValueError(f"photometric={requested!r}: accepted values are "
                         f"{', '.join(PHOTOMETRIC_IMPLS)}")
    if gpu and choice == "numba":
        raise ValueError("photometric='numba' runs in DALI's CPU mode only; on a CUDA device "
                         "use 'stage'")
    return choice


def dlpack_tensor(outputs) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) as one torch tensor on the same memory, no copy.
    The pipeline's default (dynamic) executor never reuses a returned buffer, and on the GPU
    DALI's __dlpack__ makes torch's current stream wait for the producing stream (no host
    sync). DALIGenericIterator would instead copy every output into torch-owned memory: at
    batch 256 from 500 x 500 canvases that is 192 MB read and 192 MB written per batch."""
    return from_dlpack(outputs.as_tensor())


def _hwc_to_nchw(parts: list[torch.Tensor], settings: LoaderSettings) -> torch.Tensor:
    """[B, H, W, 3] per crop -> [n*B, 3, H, W], crop-major; channels-last strides."""
    x = (torch.cat(parts) if len(parts) > 1 else parts[0]).permute(0, 3, 1, 2)
    x = x.to(settings.device, settings.dtype, non_blocking=True)
    return x if settings.channels_last else x.contiguous()


class StageCrops:
    """photometric="stage": DALI decodes into a [B, S, S, 3] canvas (canvas_graph) and the
    device stage (GpuMultiCrop, as for FFCV) makes the crops from the zero-copy hand-off."""

    name = "stage"

    def __init__(self, spec: MultiCropSpec, settings: LoaderSettings, side: int):
        self.settings = settings
        self.canvas_shape = (side, side, 3)
        self.stage = GpuMultiCrop(spec, settings.device, settings.dtype, settings.channels_last,
                                  settings.seed, rank=settings.rank, impl=settings.stage_impl)

    def graph(self, data: tuple, device: DaliDevice, run: dict):
        return canvas_graph(*data, self.canvas_shape[0], device.gpu, **run)

    def decoded(self, make_pipe: Callable, steps: int, start_step: int) -> Iterator[tuple]:
        """(canvas, sizes, labels) of steps start_step..steps - 1 of the graph make_pipe()."""
        pipe = make_pipe()
        try:
            for step in range(steps):
                canvas, sizes, labels = pipe.run()
                if step < start_step:  # resume: same seeds, so dropping replays the order
                    continue
                labels = parse_labels(dlpack_tensor(labels))
                yield (dlpack_tensor(canvas), dlpack_tensor(sizes),
                       labels.to(self.settings.device, non_blocking=True))
        finally:
            del pipe

    def to_images(self, canvas: torch.Tensor, sizes: torch.Tensor) -> DeviceImages:
        """One hand-off as the stage's input: the canvas on the training device, read in
        place (a no-op move in GPU mode, where DALI's canvas already is there)."""
        return from_canvas(canvas.to(self.settings.device, non_blocking=True), sizes)

    def batches(self, make_pipe: Callable, epoch: int, steps: int, start_step: int
                ) -> Iterator[MultiCropBatch]:
        hand_off = self.decoded(make_pipe, steps, start_step)
        for step, (canvas, sizes, labels) in enumerate(hand_off, start=start_step):
            yield self.stage(self.to_images(canvas, sizes), None, labels, epoch, step)


class NumbaCrops:
    """photometric="numba" (CPU mode): DALI makes the 1 + 8 crops and their augmentations
    (crops_graph, the numba operator); batches are the graph's normalised outputs."""

    name = "numba"
    canvas_shape = None  # no canvas: the graph hands out the crops

    def __init__(self, spec: MultiCropSpec, settings: LoaderSettings):
        self.spec, self.settings = spec, settings
        self.names = [f"{kind}{i}" for kind, group in zip("gl", spec.groups)
                      for i in range(group.count)]

    def graph(self, data: tuple, device: DaliDevice, run: dict):
        return crops_graph(*data, self.spec, device.dtype, **run)

    def decoded(self, make_pipe: Callable, steps: int, start_step: int):
        raise ValueError(f"decoded() needs photometric='stage', not {self.name!r}")

    def batches(self, make_pipe: Callable, epoch: int, steps: int, start_step: int
                ) -> Iterator[MultiCropBatch]:
        s, n_global = self.settings, self.spec.global_group.count
        iterator = DALIGenericIterator(make_pipe(), [*self.names, "label"], reader_name=READER,
                                       auto_reset=False, last_batch_policy=LastBatchPolicy.DROP)
        try:
            for step, outputs in enumerate(iterator):
                if step >= steps:
                    break
                if step < start_step:  # resume: same seeds, so dropping replays the order
                    continue
                crops = [outputs[0][name] for name in self.names]
                yield MultiCropBatch(
                    global_crops=_hwc_to_nchw(crops[:n_global], s),
                    local_crops=self._locals(crops[n_global:]),
                    labels=parse_labels(outputs[0]["label"].cpu()).to(s.device,
                                                                      non_blocking=True))
        finally:
            del iterator

    def _locals(self, crops: list[torch.Tensor]) -> torch.Tensor:
        if crops:
            return _hwc_to_nchw(crops, self.settings)
        s = self.settings
        return torch.empty(0, 3, 1, 1, device=s.device, dtype=s.dtype)


def crop_strategy(photometric: str | None, spec: MultiCropSpec, settings: LoaderSettings,
                  side: int) -> StageCrops | NumbaCrops:
    """The strategy of photometric_impl(photometric, device), refused first if unknown."""
    choice = photometric_impl(photometric, settings.device.type == "cuda")
    return StageCrops(spec, settings, side) if choice == "stage" else NumbaCrops(spec, settings)


class DaliTrainData:
    """Train batches as MultiCropBatch on the device, epoch by epoch (the interface of
    pipelines.loaders.reference.ReferenceTrainData). `photometric`: "stage" or "numba" (see
    photometric_impl; None picks by device), chosen once (crop_strategy). `max_resolution`:
    the stage's canvas side (see canvas_side; None reads it from meta.json)."""

    def __init__(self, folder: str, spec: MultiCropSpec, settings: LoaderSettings,
                 photometric: str | None = None, max_resolution: int | None = None):
        self.tars, self.indexes, self.num_samples = find_shards(folder)
        self.settings, self.device = settings, dali_device(settings)
        self.crops = crop_strategy(photometric, spec, settings,
                                   canvas_side(folder, max_resolution))
        try:
            self.steps_per_epoch = whole_steps(self.num_samples, settings.batch_size,
                                               settings.world_size)
        except ValueError as e:
            raise ValueError(f"{folder!r}: {e}") from None

    @property
    def photometric(self) -> str:
        return self.crops.name

    @property
    def canvas_shape(self) -> tuple[int, int, int] | None:
        return self.crops.canvas_shape

    def pipeline(self, epoch: int):
        """The epoch's graph: shard order and seeds from (seed, epoch), the same on all ranks
        for the shard permutation (so DALI's split is a partition), per rank for the rest."""
        s = self.settings
        order = np.random.default_rng(derived_seed(s.seed, epoch)).permutation(len(self.tars))
        data = ([self.tars[i] for i in order], [self.indexes[i] for i in order], s.rank,
                s.world_size, derived_seed(s.seed, epoch, s.rank, 0))
        run = {"batch_size": s.batch_size, "num_threads": max(1, s.num_workers),
               "device_id": self.device.device_id, "seed": derived_seed(s.seed, epoch, s.rank, 1)}
        return self.crops.graph(data, self.device, run)

    def decoded(self, epoch: int, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The stage graph's hand-off, steps start_step.. of the epoch: (canvas [B, S, S, 3]
        uint8, sizes [B, 2] int32, labels [B] int64), canvas and sizes on DALI's memory (the
        device's in GPU mode), labels on the training device. photometric="stage" only."""
        return self.crops.decoded(functools.partial(self.pipeline, epoch), self.steps_per_epoch,
                                  start_step)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MultiCropBatch]:
        return self.crops.batches(functools.partial(self.pipeline, epoch), epoch,
                                  self.steps_per_epoch, start_step)


class DaliValData:
    """Val images (Resize shorter side + CenterCrop), DALI shard r of world size per rank,
    padded by the reader and trimmed by the iterator so every image counts exactly once;
    yields (normalised images, labels) on the device."""

    def __init__(self, folder: str, global_size: int, settings: LoaderSettings):
        self.tars, self.indexes, self.num_images = find_shards(folder)
        self.global_size, self.settings = global_size, settings
        self.device = dali_device(settings)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s, device = self.settings, self.device
        pipe = val_graph(self.tars, self.indexes, s.rank, s.world_size, self.global_size,
                         device.gpu, device.dtype, batch_size=s.batch_size,
                         num_threads=max(1, s.num_workers), device_id=device.device_id, seed=0)
        iterator = DALIGenericIterator(pipe, ["image", "label"], reader_name=READER,
                                       auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.PARTIAL)
        try:
            for outputs in iterator:
                out = outputs[0]
                yield (_hwc_to_nchw([out["image"]], s),
                       parse_labels(out["label"].cpu()).to(s.device, non_blocking=True))
        finally:
            del iterator
