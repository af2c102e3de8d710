"""DALI loader for the multi-crop recipe (issue #5). Imports nvidia.dali; nothing else does.

Graph per image: fn.readers.webdataset (tar shards + wds2idx index files written by
tools/convert_in1k.py) -> one decode ("mixed" = nvJPEG on GPU, "cpu" in CPU mode) -> for each of
the 1 + 8 crops of pipelines/spec.py: random_resized_crop, then the photometric stage (colour
jitter with its four ops in a random order per sample, grayscale, blur, solarize), then flip +
normalise + cast in crop_mirror_normalize, HWC (so the torch view is channels-last for free).
Its randomness comes from DALI random ops, and a sample that does not get an augmentation skips
its work. CPU mode runs the stage as one numba_function per crop fed by one uniform-draw op
(pipelines/photometric_numba.py); GPU mode as DALI operators under conditionals, with per-sample
scalars on the host until they meet the image (the "ops" implementation, which CPU mode can run
too, and the tests do). No per-sample Python runs in either mode. docs/DALI.md lists every
parameter mapping and its tolerance.

Data order: per epoch, the shard files are permuted and the reader's shuffle buffer reseeded,
both from (seed, epoch); rank r reads DALI shard r of num_shards = world size; every rank stops
after n // (batch * world) steps (drop policy, as the reference). Resume: the pipeline of an
epoch is rebuilt from the same seeds and its first start_step batches are drawn and dropped, so
a resumed run sees exactly the batches (order and augmentations) of an uninterrupted one.
"""
from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.numba import NumbaFunction
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.batch import LoaderSettings, MultiCropBatch, derived_seed
from pipelines.photometric_numba import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    NO_SOLARIZE,
    NUM_DRAWS,
    NUM_PARAMS,
    P_FACTORS,
    P_GRAY,
    P_JITTER,
    P_KEYS,
    P_SIGMA,
    P_THRESHOLD,
    SATURATION,
    augment,
    params_from,
    spec_vector,
)
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, CropSpec, MultiCropSpec, val_resize_size

READER = "shards"
LABEL_BYTES = 8  # a `.cls` is ASCII decimal; padded with zero bytes to this many
SHUFFLE_BUFFER = 8192  # samples held by the reader's shuffle buffer (encoded JPEGs)
# HSV -> RGB without branches: channel n = V - C * clamp(min(k, 4 - k), 0, 1) with
# k = (n + H) mod 6, H the hue in sixths of a turn, n = 5, 3, 1 for R, G, B (V = max,
# C = max - min); shape [1, 1, 3] so it broadcasts over an HWC image's channels.
HUE_OFFSETS = np.array([5, 3, 1], dtype=np.float32).reshape(1, 1, 3)
MEAN_255 = [255 * m for m in IMAGENET_MEAN]  # crop_mirror_normalize works in uint8 units
STD_255 = [255 * s for s in IMAGENET_STD]
PHOTOMETRIC_IMPLS = ("numba", "ops")  # see photometric()


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
            raise ValueError(f"{path!r}: not a DALI wds2idx index (first line {head})")
        total += int(head[1])
    return tars, indexes, total


def count_classes(folder: str, tars: list[str], indexes: list[str]) -> int:
    """From the converter's meta.json (<data>/meta.json) if present, else the largest `.cls`
    read through the index offsets (one seek per sample, no tar parsing)."""
    meta = os.path.join(folder, os.pardir, os.pardir, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            classes = json.load(f).get("classes")
        if classes:
            return len(classes)
    largest = -1
    for tar, index in zip(tars, indexes):
        with open(index) as f, open(tar, "rb") as data:
            for line in f.readlines()[1:]:
                fields = line.split()
                for ext, offset, size in zip(fields[0::4], fields[1::4], fields[2::4]):
                    if ext == "cls":
                        data.seek(int(offset))
                        largest = max(largest, int(data.read(int(size))))
    return largest + 1


def parse_labels(raw: torch.Tensor) -> torch.Tensor:
    """[B, LABEL_BYTES] ASCII digits right-padded with zeros -> [B] int64, vectorised."""
    valid = raw > 0
    digits = (raw.long() - ord("0")).clamp(min=0) * valid
    power = (valid.sum(1, keepdim=True) - 1 - torch.arange(raw.shape[1])).clamp(min=0)
    return (digits * torch.pow(10, power)).sum(1)


# ---------------------------------------------------------------- graph
def _on(node, gpu: bool):
    """Per-sample scalars are drawn on the host; arithmetic with a GPU image needs them there."""
    return node.gpu() if gpu else node


def _uniforms():
    """The photometric randomness of one crop: NUM_DRAWS uniforms per sample, one DALI op."""
    return fn.random.uniform(range=(0.0, 1.0), shape=[NUM_DRAWS])


def _spec_node(group: CropSpec):
    return types.Constant(spec_vector(group), device="cpu")


def draws(group: CropSpec) -> list:
    """GPU mode's photometric parameters, host scalars in photometric_numba's P_* layout: the
    uniforms mapped by photometric_numba.params_from (in a CPU numba_function), the mapping CPU
    mode's augment applies inside its own call."""
    params = _params_op()(_uniforms(), _spec_node(group))
    return [params[k] for k in range(NUM_PARAMS)]


def photometric_numba_op(crop, group: CropSpec, uniforms=None):
    """CPU mode: the photometric stage as one numba_function call per crop
    (pipelines/photometric_numba.augment), which skips the ops a sample does not get; its
    randomness is one DALI op, NUM_DRAWS uniforms per sample (or the `uniforms` given)."""
    if uniforms is None:
        uniforms = _uniforms()
    out = _augment_op()(crop, uniforms, _spec_node(group))
    return fn.reshape(out, layout="HWC")  # numba_function drops the layout


def photometric_ops(crop, params: list, gpu: bool):
    """GPU mode (runs on the CPU too): jitter (random order), grayscale, blur, solarize with
    the given draws (see draws) as DALI operators under conditionals, so a skipped op does no
    work either; uint8 between ops."""
    if params[P_JITTER] > 0.5:
        crop = jitter_ops(crop, params[P_FACTORS:P_FACTORS + 4], params[P_KEYS:P_KEYS + 4],
                          gpu)
    if params[P_GRAY] > 0.5:
        crop = grayscale(crop)
    if params[P_SIGMA] > 0:
        crop = fn.gaussian_blur(crop, sigma=params[P_SIGMA])
    if params[P_THRESHOLD] < NO_SOLARIZE:
        crop = solarize(crop, _on(params[P_THRESHOLD], gpu))
    return crop


def jitter_ops(crop, factors: list, keys: list, gpu: bool):
    """ColorJitter in DALI operators, rounded to uint8 after each op; op k runs at the rank of
    keys[k], taken through conditionals (one branch per position)."""
    ranks = _ranks(keys)
    for position in range(len(ranks)):
        if ranks[BRIGHTNESS] == position:
            crop = fn.cast(_on(factors[BRIGHTNESS], gpu) * crop, dtype=types.UINT8)
        elif ranks[CONTRAST] == position:
            c = factors[CONTRAST]
            gray = fn.color_space_conversion(crop, image_type=types.RGB,
                                             output_type=types.GRAY)
            mean = fn.reductions.mean(gray, keep_dims=True)  # [1, 1, 1] per sample
            crop = fn.cast(_on(c, gpu) * crop + _on(1 - c, gpu) * mean, dtype=types.UINT8)
        elif ranks[SATURATION] == position:
            crop = fn.hsv(crop, saturation=factors[SATURATION])
        else:
            crop = fn.cast(adjust_hue(fn.cast(crop, dtype=types.FLOAT),
                                      _on(factors[HUE], gpu)), dtype=types.UINT8)
    return crop


def _ranks(keys: list) -> list:
    """Rank of each of the 4 keys (ascending, ties by index, as photometric_numba.order_of): a
    permutation of 0..3 per sample, computed on host scalars."""
    return [sum(fn.cast(keys[j] <= keys[i] if j < i else keys[j] < keys[i], dtype=types.INT32)
                for j in range(4) if j != i) for i in range(4)]


@functools.cache
def _augment_op() -> NumbaFunction:
    """One operator instance per process, called once per crop: compiling its C callbacks
    takes seconds, so a new instance per call (fn.numba_function) would cost that per crop and
    per epoch's pipeline."""
    return NumbaFunction(run_fn=_run_augment, setup_fn=_same_shape,
                         in_types=[types.UINT8, types.FLOAT, types.FLOAT], ins_ndim=[3, 1, 1],
                         out_types=[types.UINT8], outs_ndim=[3], device="cpu")


def _run_augment(out0, in0, in1, in2):
    """numba_function's run_fn (a plain function: DALI compiles it with numba.njit)."""
    augment(out0, in0, in1, in2)


@functools.cache
def _params_op() -> NumbaFunction:
    """uniforms [NUM_DRAWS] + spec vector -> params [NUM_PARAMS], per sample on the CPU."""
    return NumbaFunction(run_fn=_run_params, setup_fn=_params_shape,
                         in_types=[types.FLOAT, types.FLOAT], ins_ndim=[1, 1],
                         out_types=[types.FLOAT], outs_ndim=[1], device="cpu")


def _run_params(out0, in0, in1):
    out0[:] = params_from(in0, in1)


def _params_shape(outs, ins):
    for i in range(len(outs[0])):
        outs[0][i][0] = NUM_PARAMS


def _same_shape(outs, ins):
    """numba_function's setup: the output has the crop's shape."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


def adjust_hue(x, hue):
    """torchvision's adjust_hue (H of HSV shifted by `hue` turns, S and V kept) on a float HWC
    image in any scale, per-sample `hue`. Not fn.hsv's hue: it rotates chroma linearly in YIQ,
    ~20/255 mean error at 36 degrees on saturated images."""
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    maxc = dmath.max(dmath.max(r, g), b)
    chroma = maxc - dmath.min(dmath.min(r, g), b)
    safe = dmath.max(chroma, 1e-6)  # grey pixels: any hue gives maxc, so any divisor will do
    is_r = maxc == r  # torchvision's tie order: R, then G, then B
    is_g = (maxc == g) & (maxc != r)
    is_b = (maxc != g) & (maxc != r)
    h6 = (is_r * (g - b) + is_g * (2 * safe + b - r) + is_b * (4 * safe + r - g)) / safe
    k = types.Constant(HUE_OFFSETS) + (h6 + 6 * hue)
    k = k - 6 * dmath.floor(k / 6)
    return maxc - chroma * dmath.clamp(dmath.min(k, 4 - k), 0, 1)


def grayscale(crop):
    """ITU-R 601 luma (PIL's "L") in all three channels. Not fn.hsv(saturation=0): its YIQ
    round trip leaves the channels up to 1/255 apart, so the crop is not exactly grey."""
    gray = fn.color_space_conversion(crop, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(gray, gray, gray, axis=2)


def solarize(crop, threshold):
    """x >= t -> 255 - x on uint8 (t a number or a per-sample scalar): XOR with 255 where the
    mask is set."""
    mask = fn.cast(crop >= threshold, dtype=types.UINT8)
    return crop ^ (mask * types.Constant(255, dtype=types.UINT8))


def _crop(image, group: CropSpec, gpu: bool, dtype, photometric_impl: str):
    """One crop of a group in the recipe's order; the flip happens last, in
    crop_mirror_normalize: every op after it is pixel-wise or a symmetric blur, so it commutes."""
    crop = fn.random_resized_crop(image, size=[group.size, group.size],
                                  random_area=list(group.scale),
                                  random_aspect_ratio=list(group.ratio), num_attempts=10,
                                  interp_type=types.INTERP_CUBIC, antialias=True)
    if photometric_impl == "numba":
        crop = photometric_numba_op(crop, group)
    else:
        crop = photometric_ops(crop, draws(group), gpu)
    return fn.crop_mirror_normalize(crop, mirror=fn.random.coin_flip(probability=group.flip_p),
                                    mean=MEAN_255, std=STD_255, dtype=dtype,
                                    output_layout="HWC")


def _reader(tars: list[str], indexes: list[str], rank: int, world: int, **shuffle):
    jpegs, cls = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "cls"],
                                       missing_component_behavior="error", shard_id=rank,
                                       num_shards=world, stick_to_shard=True, name=READER,
                                       **shuffle)
    return jpegs, fn.pad(cls, fill_value=0, shape=[LABEL_BYTES])


@pipeline_def(enable_conditionals=True)
def train_graph(tars, indexes, rank, world, reader_seed, spec: MultiCropSpec, gpu, dtype,
                photometric_impl):
    jpegs, labels = _reader(tars, indexes, rank, world, random_shuffle=True,
                            initial_fill=SHUFFLE_BUFFER, seed=reader_seed)
    image = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    crops = []
    for group in spec.groups:
        for _ in range(group.count):
            crops.append(_crop(image, group, gpu, dtype, photometric_impl))
    return (*crops, labels)


@pipeline_def
def val_graph(tars, indexes, rank, world, global_size, gpu, dtype):
    jpegs, labels = _reader(tars, indexes, rank, world, pad_last_batch=True)
    image = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    image = fn.resize(image, resize_shorter=val_resize_size(global_size),
                      interp_type=types.INTERP_LINEAR, antialias=True)
    image = fn.crop_mirror_normalize(image, crop=(global_size, global_size), mean=MEAN_255,
                                     std=STD_255, dtype=dtype, output_layout="HWC")
    return image, labels


# ---------------------------------------------------------------- loaders
def _device_args(settings: LoaderSettings) -> dict:
    """DALI's dtype (no bfloat16 in DALI: fp16 then a cast on the device) and device id."""
    gpu = settings.device.type == "cuda"
    dtype = types.FLOAT if settings.dtype == torch.float32 else types.FLOAT16
    device_id = (settings.device.index or torch.cuda.current_device()) if gpu else None
    return {"gpu": gpu, "dtype": dtype, "device_id": device_id}


def photometric_impl(requested: str | None, gpu: bool) -> str:
    """The photometric stage's implementation: "numba" in CPU mode, "ops" in GPU mode (a CPU
    numba_function cannot take GPU crops), or the one requested ("ops" runs in CPU mode too)."""
    choice = requested or ("ops" if gpu else "numba")
    if choice not in PHOTOMETRIC_IMPLS:
        raise ValueError(f"photometric={requested!r}: expected one of {PHOTOMETRIC_IMPLS}")
    if gpu and choice == "numba":
        raise ValueError("photometric='numba' runs on the CPU; GPU mode takes 'ops'")
    return choice


def _hwc_to_nchw(parts: list[torch.Tensor], settings: LoaderSettings) -> torch.Tensor:
    """[B, H, W, 3] per crop -> [n*B, 3, H, W], crop-major; channels-last strides."""
    x = (torch.cat(parts) if len(parts) > 1 else parts[0]).permute(0, 3, 1, 2)
    x = x.to(settings.device, settings.dtype, non_blocking=True)
    return x if settings.channels_last else x.contiguous()


class DaliTrainData:
    """Train batches as MultiCropBatch on the device, epoch by epoch (the interface of
    pipelines.reference.ReferenceTrainData). `photometric`: "numba" or "ops" (see
    photometric_impl; None picks by device)."""

    def __init__(self, folder: str, spec: MultiCropSpec, settings: LoaderSettings,
                 photometric: str | None = None):
        self.tars, self.indexes, self.num_samples = find_shards(folder)
        self.spec, self.settings = spec, settings
        self.photometric = photometric_impl(photometric, settings.device.type == "cuda")
        self._num_classes = count_classes(folder, self.tars, self.indexes)
        self.steps_per_epoch = self.num_samples // (settings.batch_size * settings.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{folder!r}: {self.num_samples} training images are fewer than "
                             f"one global batch ({settings.batch_size} x {settings.world_size})")
        self.names = [f"{kind}{i}" for kind, group in zip("gl", spec.groups)
                      for i in range(group.count)]

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def pipeline(self, epoch: int):
        """The epoch's graph: shard order and seeds from (seed, epoch), the same on all ranks
        for the shard permutation (so DALI's split is a partition), per rank for the rest."""
        s = self.settings
        order = np.random.default_rng(derived_seed(s.seed, epoch)).permutation(len(self.tars))
        dev = _device_args(s)
        return train_graph(
            [self.tars[i] for i in order], [self.indexes[i] for i in order], s.rank,
            s.world_size, derived_seed(s.seed, epoch, s.rank, 0), self.spec, dev["gpu"],
            dev["dtype"], self.photometric, batch_size=s.batch_size,
            num_threads=max(1, s.num_workers), device_id=dev["device_id"],
            seed=derived_seed(s.seed, epoch, s.rank, 1))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MultiCropBatch]:
        s = self.settings
        n_global = self.spec.global_group.count
        iterator = DALIGenericIterator(self.pipeline(epoch), [*self.names, "label"],
                                       reader_name=READER, auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.DROP)
        try:
            for step, outputs in enumerate(iterator):
                if step >= self.steps_per_epoch:
                    break
                if step < start_step:  # resume: same seeds, so dropping replays the order
                    continue
                out = outputs[0]
                crops = [out[name] for name in self.names]
                yield MultiCropBatch(
                    global_crops=_hwc_to_nchw(crops[:n_global], s),
                    local_crops=self._locals(crops[n_global:]),
                    labels=parse_labels(out["label"].cpu()).to(s.device, non_blocking=True))
        finally:
            del iterator

    def _locals(self, crops: list[torch.Tensor]) -> torch.Tensor:
        if crops:
            return _hwc_to_nchw(crops, self.settings)
        s = self.settings
        return torch.empty(0, 3, 1, 1, device=s.device, dtype=s.dtype)


class DaliValData:
    """Val images (Resize shorter side + CenterCrop), DALI shard r of world size per rank,
    padded by the reader and trimmed by the iterator so every image counts exactly once;
    yields (normalised images, labels) on the device."""

    def __init__(self, folder: str, global_size: int, settings: LoaderSettings):
        self.tars, self.indexes, self.num_images = find_shards(folder)
        self.global_size, self.settings = global_size, settings

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.settings
        dev = _device_args(s)
        pipe = val_graph(self.tars, self.indexes, s.rank, s.world_size, self.global_size,
                         dev["gpu"], dev["dtype"], batch_size=s.batch_size,
                         num_threads=max(1, s.num_workers), device_id=dev["device_id"], seed=0)
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
