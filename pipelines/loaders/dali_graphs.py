"""The DALI graphs of the DALI loader (pipelines/loaders/dali_multicrop.py), which picks one
per run at construction: `canvas_graph` (photometric="stage": decode once, pad to a fixed
canvas for the device stage), `crops_graph` (photometric="numba": the crops and their
augmentations in DALI, CPU mode) and `val_graph`. GPU mode differs from CPU mode only in its
device strings ("mixed" = nvJPEG decode). Imports nvidia.dali.
"""
from __future__ import annotations

import functools

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.numba import NumbaFunction

from pipelines.loaders.photometric_numba import NUM_DRAWS, augment, spec_vector
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, CropSpec, MultiCropSpec, val_resize_size

READER = "shards"
LABEL_BYTES = 8  # a `.cls` is ASCII decimal; padded with zero bytes to this many
SHUFFLE_BUFFER = 8192  # samples held by the reader's shuffle buffer (encoded JPEGs)
MEAN_255 = [255 * m for m in IMAGENET_MEAN]  # crop_mirror_normalize works in uint8 units
STD_255 = [255 * s for s in IMAGENET_STD]


def parse_labels(raw: torch.Tensor) -> torch.Tensor:
    """[B, LABEL_BYTES] ASCII digits right-padded with zeros -> [B] int64, vectorised."""
    valid = raw > 0
    digits = (raw.long() - ord("0")).clamp(min=0) * valid
    power = (valid.sum(1, keepdim=True) - 1 - torch.arange(raw.shape[1])).clamp(min=0)
    return (digits * torch.pow(10, power)).sum(1)


def _reader(tars: list[str], indexes: list[str], rank: int, world: int, **shuffle):
    jpegs, cls = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "cls"],
                                       missing_component_behavior="error", shard_id=rank,
                                       num_shards=world, stick_to_shard=True, name=READER,
                                       **shuffle)
    return jpegs, fn.pad(cls, fill_value=0, shape=[LABEL_BYTES])


def _decode(jpegs, gpu: bool):
    return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)


@pipeline_def(enable_conditionals=True)
def canvas_graph(tars, indexes, rank, world, reader_seed, side: int, gpu: bool):
    """The stage hand-off: canvas [B, side, side, 3] uint8 with each decoded image at its
    top-left (zeros elsewhere), sizes [B, 2] int32 (height, width) and the label bytes. GPU
    mode differs only in its device strings ("mixed" decode, sizes moved to the GPU)."""
    jpegs, labels = _reader(tars, indexes, rank, world, random_shuffle=True,
                            initial_fill=SHUFFLE_BUFFER, seed=reader_seed)
    image = _decode(jpegs, gpu)
    hw = image.shape(dtype=types.INT32)  # [3] per sample, on the CPU in both modes
    if (hw[0] > side) | (hw[1] > side):  # only images not from the converter (or a smaller S)
        image = fn.resize(image, resize_longer=side, interp_type=types.INTERP_LINEAR,
                          antialias=True)  # downscale with a triangle filter, like INTER_AREA
    sizes = image.shape(dtype=types.INT32)[0:2]
    canvas = fn.pad(image, axes=(0, 1), shape=(side, side), fill_value=0)
    return canvas, sizes.gpu() if gpu else sizes, labels


def _uniforms():
    """The photometric randomness of one crop: NUM_DRAWS uniforms per sample, one DALI op."""
    return fn.random.uniform(range=(0.0, 1.0), shape=[NUM_DRAWS])


def photometric_numba_op(crop, group: CropSpec, uniforms=None):
    """CPU mode: the photometric stage as one numba_function call per crop
    (pipelines/photometric_numba.augment), which skips the ops a sample does not get; its
    randomness is one DALI op, NUM_DRAWS uniforms per sample (or the `uniforms` given)."""
    if uniforms is None:
        uniforms = _uniforms()
    spec = types.Constant(spec_vector(group), device="cpu")
    out = _augment_op()(crop, uniforms, spec)
    return fn.reshape(out, layout="HWC")  # numba_function drops the layout


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


def _same_shape(outs, ins):
    """numba_function's setup: the output has the crop's shape."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


def _crop(image, group: CropSpec, dtype):
    """One crop of a group in the recipe's order; the flip happens last, in
    crop_mirror_normalize: every op after it is pixel-wise or a symmetric blur, so it commutes."""
    crop = fn.random_resized_crop(image, size=[group.size, group.size],
                                  random_area=list(group.scale),
                                  random_aspect_ratio=list(group.ratio), num_attempts=10,
                                  interp_type=types.INTERP_CUBIC, antialias=True)
    crop = photometric_numba_op(crop, group)
    return fn.crop_mirror_normalize(crop, mirror=fn.random.coin_flip(probability=group.flip_p),
                                    mean=MEAN_255, std=STD_255, dtype=dtype,
                                    output_layout="HWC")


@pipeline_def
def crops_graph(tars, indexes, rank, world, reader_seed, spec: MultiCropSpec, dtype):
    """CPU mode's crops: 1 + 8 normalised HWC crops per image and the label bytes."""
    jpegs, labels = _reader(tars, indexes, rank, world, random_shuffle=True,
                            initial_fill=SHUFFLE_BUFFER, seed=reader_seed)
    image = _decode(jpegs, gpu=False)
    crops = [_crop(image, group, dtype) for group in spec.groups for _ in range(group.count)]
    return (*crops, labels)


@pipeline_def
def val_graph(tars, indexes, rank, world, global_size, gpu, dtype):
    jpegs, labels = _reader(tars, indexes, rank, world, pad_last_batch=True)
    image = _decode(jpegs, gpu)
    image = fn.resize(image, resize_shorter=val_resize_size(global_size),
                      interp_type=types.INTERP_LINEAR, antialias=True)
    image = fn.crop_mirror_normalize(image, crop=(global_size, global_size), mean=MEAN_255,
                                     std=STD_255, dtype=dtype, output_layout="HWC")
    return image, labels
