"""The loaders' decode strategies (issue #23): each mode is an object chosen once at
construction, knows its canvas shape, and turns one loader batch into the stage's input; a
bad mode is refused at construction, naming the accepted ones. Unit tests: synthetic batches,
no .beton, no shards, no training.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.batch import LoaderSettings
from pipelines.spec import CropSpec, MultiCropSpec
from pipelines.stage.handoff import META_COLUMNS, PACKED, PLANES, SampleMeta

CPU = torch.device("cpu")
SPEC = MultiCropSpec(CropSpec(1, 32, (0.25, 1.0), blur_p=1.0, solarize_p=0.0),
                     CropSpec(2, 16, (0.05, 0.25), blur_p=0.5, solarize_p=0.2))


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (8, 4), (3, 3))]


def _packed(images: list[np.ndarray], hmax: int, wmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CanvasDecoder's output for these images: packed slots + a status byte, and (h, w)."""
    packed = torch.zeros(len(images), hmax * wmax * 3 + 1, dtype=torch.uint8)
    for b, image in enumerate(images):
        packed[b, :image.size] = torch.from_numpy(image.reshape(-1))
    sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.int32)
    return packed, sizes


def _jpeg(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_sample_meta_reads_the_columns_by_name():
    table = torch.tensor([[5, 7, 120, 1], [8, 4, 96, 0]], dtype=torch.int32)
    meta = SampleMeta(table)
    assert META_COLUMNS == ("height", "width", "nbytes", "is_jpeg")
    assert meta.sizes.tolist() == [[5, 7], [8, 4]]
    assert meta.nbytes.tolist() == [120, 96] and meta.is_jpeg.tolist() == [1, 0]
    assert SampleMeta(table[:, :2]).sizes.tolist() == [[5, 7], [8, 4]]  # the CPU decode's table


# ---------------------------------------------------------------- FFCV
@pytest.mark.ffcv
@pytest.mark.parametrize("mode", ["nvjpeg", "GPU", ""])
def test_ffcv_refuses_a_bad_mode_before_reading_the_file(mode):
    from pipelines.loaders.ffcv_decode import decode_strategy
    with pytest.raises(ValueError) as refused:
        decode_strategy(mode, reader=None)  # refused before the reader is touched
    assert str(refused.value) == f"decode={mode!r}: accepted values are cpu, gpu"


@pytest.mark.ffcv
def test_ffcv_strategies_know_their_canvas_and_ops():
    from pipelines.loaders.ffcv_decode import CpuDecode, GpuDecode
    from pipelines.loaders.ffcv_ops import (
        BytesPassthrough,
        CanvasDecoder,
        ImageSizeDecoder,
        SampleInfoDecoder,
    )
    cpu, gpu = CpuDecode((8, 7)), GpuDecode((8, 7), max_bytes=900)
    assert cpu.name == "cpu" and cpu.canvas_shape == (8, 7, 3)
    assert gpu.name == "gpu" and gpu.canvas_shape == (8, 7, 3)
    image_op, meta_op = cpu.ops()
    assert isinstance(image_op, CanvasDecoder) and image_op.max_size == (8, 7)
    assert isinstance(meta_op, ImageSizeDecoder)
    image_op, meta_op = gpu.ops()
    assert isinstance(image_op, BytesPassthrough) and image_op.max_bytes == 900
    assert image_op.max_size == (8, 7) and isinstance(meta_op, SampleInfoDecoder)


@pytest.mark.ffcv
def test_cpu_decode_turns_a_batch_into_packed_rows_and_replaces_a_failed_decode():
    from pipelines.loaders.ffcv_decode import CpuDecode
    images = _images()
    packed, sizes = _packed(images, 8, 7)
    labels = torch.tensor([0, 1, 2])
    packed[1, -1] = 1  # the decoder's status byte: sample 1 failed
    strategy = CpuDecode((8, 7))
    assert strategy.on_host(packed, sizes, labels) == 1
    assert labels.tolist() == [0, 2, 2] and sizes[1].tolist() == [3, 3]  # the next good one
    strategy.start_epoch(CPU)
    out, replaced = strategy.to_images(packed, sizes, labels, CPU)
    assert replaced == 0 and out.layout == PACKED and out.canvas_hw == (8, 7)
    canvas = out.to_canvas()
    for b, image in enumerate([images[0], images[2], images[2]]):
        h, w, _ = image.shape
        assert np.array_equal(canvas[b, :h, :w].numpy(), image)
    # only the used prefix travelled: the largest image is 5 x 7
    assert strategy.host_to_device.last_bytes == 3 * 5 * 7 * 3
    assert torch.equal(strategy.to_canvas(packed, sizes, CPU), canvas)


@pytest.mark.ffcv
def test_gpu_decode_turns_stored_bytes_into_planes_and_relabels_a_failed_jpeg():
    from pipelines.loaders.ffcv_decode import GpuDecode
    images = _images(1)
    streams = [_jpeg(image) for image in images]
    streams[2] = streams[2][:20]  # a truncated JPEG
    slot = max(8 * 7 * 3, max(map(len, streams)))
    stored = torch.zeros(3, slot, dtype=torch.uint8)
    for b, stream in enumerate(streams):
        stored[b, :len(stream)] = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    meta = torch.tensor([[*image.shape[:2], len(stream), 1]
                         for image, stream in zip(images, streams)], dtype=torch.int32)
    labels = torch.tensor([4, 5, 6])
    strategy = GpuDecode((8, 7), max_bytes=slot)
    assert strategy.on_host(stored, meta, labels) == 0  # nothing decodes on the host
    out, replaced = strategy.to_images(stored, meta, labels, CPU)
    assert replaced == 1 and labels.tolist() == [4, 5, 4]  # sample 2 took sample 0's image
    assert out.layout == PLANES and out.canvas_hw == (8, 7)
    canvas = out.to_canvas()
    for b, source in enumerate([streams[0], streams[1], streams[0]]):
        want = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), dtype=float)
        h, w, _ = want.shape
        diff = np.abs(canvas[b, :h, :w].numpy() - want)
        assert diff.mean() < 2, diff.mean()  # PIL's and torchvision's libjpeg may differ


# ---------------------------------------------------------------- DALI
def _settings(dtype=torch.float32) -> LoaderSettings:
    return LoaderSettings(batch_size=4, num_workers=1, seed=0, rank=0, world_size=1, device=CPU,
                          dtype=dtype, channels_last=True)


@pytest.mark.dali
def test_dali_device_is_decided_once_from_the_settings():
    from nvidia.dali import types

    from pipelines.loaders.dali_multicrop import dali_device
    device = dali_device(_settings())
    assert (device.gpu, device.device_id, device.dtype) == (False, None, types.FLOAT)
    assert dali_device(_settings(torch.bfloat16)).dtype == types.FLOAT16  # DALI has no bf16


@pytest.mark.dali
def test_dali_strategies_know_their_canvas():
    from pipelines.loaders.dali_multicrop import NumbaCrops, StageCrops, crop_strategy
    stage = crop_strategy("stage", SPEC, _settings(), side=50)
    assert isinstance(stage, StageCrops) and stage.canvas_shape == (50, 50, 3)
    numba = crop_strategy(None, SPEC, _settings(), side=50)  # CPU device: numba by default
    assert isinstance(numba, NumbaCrops) and numba.canvas_shape is None
    assert numba.names == ["g0", "l0", "l1"]
    with pytest.raises(ValueError, match="decoded\\(\\) needs photometric='stage'"):
        numba.decoded(lambda: pytest.fail("no graph is built"), 1, 0)


@pytest.mark.dali
@pytest.mark.parametrize("mode", ["ops", "gpu"])
def test_dali_refuses_a_bad_mode_at_construction(mode):
    from pipelines.loaders.dali_multicrop import crop_strategy
    with pytest.raises(ValueError) as refused:
        crop_strategy(mode, SPEC, _settings(), side=50)
    assert str(refused.value) == f"photometric={mode!r}: accepted values are numba, stage"
