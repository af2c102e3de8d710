"""pipelines/loaders/ffcv_multicrop.py on tiny .beton files written here with ffcv's DatasetWriter.

The betons are written in a spawned process before any Loader runs (a DatasetWriter forked
after numba code ran can deadlock). Most tests disable FFCV's numba compilation (it costs ~18 s
per process); `test_compiled_path_matches_reference_decode` runs the real compiled path.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines import demo_data
from pipelines.loaders.reference import LoaderSettings, ReferenceValData, load_rgb
from pipelines.spec import CropSpec, MultiCropSpec
from pipelines.stage.torch_spec import unpack_canvas
from tests.helpers import assert_batch_contract, run_in_spawned_process

pytestmark = pytest.mark.ffcv

SPEC = MultiCropSpec(CropSpec(1, 64, (0.25, 1.0), blur_p=0.2, solarize_p=0.2),
                     CropSpec(2, 32, (0.05, 0.25), blur_p=0.5, solarize_p=0.0))


def _write_betons(root: str) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    for split, mode in (("train", "jpg"), ("val", "jpg"), ("train", "raw")):
        folder = ImageFolder(os.path.join(root, split))
        name = f"{split}.beton" if mode == "jpg" else "train_raw.beton"
        fields = {"image": RGBImageField(write_mode=mode, max_resolution=256, jpeg_quality=90),
                  "label": IntField()}
        DatasetWriter(os.path.join(root, name), fields, num_workers=1).from_indexed_dataset(
            folder)


@pytest.fixture(scope="session")
def beton_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("beton"))
    demo_data.write_dataset(root, train_per_class=3, val_per_class=2)
    run_in_spawned_process(_write_betons, root)
    return root


def _settings(batch_size: int, rank: int = 0, world_size: int = 1) -> LoaderSettings:
    return LoaderSettings(batch_size=batch_size, num_workers=1, seed=3, rank=rank,
                          world_size=world_size, device=torch.device("cpu"),
                          dtype=torch.float32, channels_last=True)


def _reference_images(root: str, split: str) -> list[np.ndarray]:
    from torchvision.datasets import ImageFolder
    return [np.asarray(load_rgb(p)) for p, _ in ImageFolder(os.path.join(root, split)).samples]


def _check_canvases(data, root: str, tol: float) -> int:
    """Each decoded canvas holds its image at the top-left with its true size; returns the
    number of images checked. JPEG re-encoding at quality 90 is the tolerance (mean |diff|)."""
    images = _reference_images(root, "train")
    sampler_order = [i for _, i in data.sampler]
    seen = 0
    for step, (packed, sizes, labels) in enumerate(data.decoded(0)):
        canvas = unpack_canvas(packed, sizes, *data.canvas_shape[:2])
        assert canvas.dtype == torch.uint8 and canvas.shape[-1] == 3
        assert canvas.shape[1:3] == (max(a.shape[0] for a in images),
                                     max(a.shape[1] for a in images))
        for row in range(len(labels)):
            want = images[sampler_order[step * data.settings.batch_size + row]]
            h, w = sizes[row].tolist()
            assert (h, w) == want.shape[:2]
            diff = np.abs(canvas[row, :h, :w].numpy().astype(float) - want)
            assert diff.mean() < tol, diff.mean()
            assert not canvas[row, h:].any() and not canvas[row, :, w:].any()
            seen += 1
    return seen


def test_decoder_puts_each_image_at_top_left_jpg(beton_root, no_jit):
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    data = FfcvTrainData(os.path.join(beton_root, "train.beton"), SPEC, _settings(4))
    assert _check_canvases(data, beton_root, tol=3.0) == data.steps_per_epoch * 4


def test_decoder_copies_raw_images_exactly(beton_root, no_jit):
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    data = FfcvTrainData(os.path.join(beton_root, "train_raw.beton"), SPEC, _settings(4))
    assert _check_canvases(data, beton_root, tol=1e-9) > 0


def test_epoch_yields_multicrop_batches_deterministically(beton_root, no_jit):
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    data = FfcvTrainData(os.path.join(beton_root, "train.beton"), SPEC, _settings(4))
    first = list(data.epoch(1))
    again = list(data.epoch(1, start_step=2))
    assert len(first) == data.steps_per_epoch == 6 and len(again) == 4
    b = first[0]
    assert b.global_crops.shape == (4, 3, 64, 64) and b.local_crops.shape == (8, 3, 32, 32)
    assert b.local_crops.is_contiguous(memory_format=torch.channels_last)
    assert_batch_contract(b, SPEC, _settings(4))
    for x, y in zip(first[2:], again):  # resuming mid-epoch gives the same batches
        assert torch.equal(x.labels, y.labels) and torch.equal(x.global_crops, y.global_crops)
    other = next(iter(data.epoch(2)))
    assert not torch.equal(other.local_crops, first[0].local_crops)


def test_ranks_split_each_epoch_without_overlap(beton_root, no_jit):
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    beton = os.path.join(beton_root, "train.beton")
    orders = []
    for rank in (0, 1):
        data = FfcvTrainData(beton, SPEC, _settings(4, rank, 2))
        orders.append(set(data.loader.traversal_order.sample_order(5).tolist()))
        assert data.steps_per_epoch == 3
    assert not orders[0] & orders[1] and len(orders[0]) == 12


def test_val_matches_reference_val(beton_root, no_jit):
    from pipelines.loaders.ffcv_multicrop import FfcvValData
    settings = _settings(5)
    ours = list(FfcvValData(os.path.join(beton_root, "val.beton"), 64, settings))
    ref = list(ReferenceValData(os.path.join(beton_root, "val"), 64,
                                LoaderSettings(**{**settings.__dict__, "num_workers": 0})))
    ours_x, ref_x = torch.cat([x for x, _ in ours]), torch.cat([x for x, _ in ref])
    assert torch.equal(torch.cat([y for _, y in ours]), torch.cat([y for _, y in ref]))
    # JPEG re-encoding in the beton + float vs uint8 resize: mean |diff| in normalised units
    assert (ours_x - ref_x).abs().mean() < 0.05


def test_missing_beton_is_a_clear_error(tmp_path):
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    with pytest.raises(FileNotFoundError, match="convert_in1k"):
        FfcvTrainData(str(tmp_path / "nope.beton"), SPEC, _settings(4))


def test_compiled_path_matches_reference_decode(beton_root):
    """The real numba-compiled, parallel path (slow: compiles once)."""
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    data = FfcvTrainData(os.path.join(beton_root, "train.beton"), SPEC, _settings(8))
    assert _check_canvases(data, beton_root, tol=3.0) == data.steps_per_epoch * 8
    batch = next(iter(data.epoch(0)))
    assert torch.isfinite(batch.global_crops).all()
    for _ in data.epoch(0):  # exhaust: an abandoned FFCV iterator can abort at exit
        pass


def _converted_with_one_corrupt_jpeg(root: str, out: str, corrupt: int) -> str:
    """train.beton written by tools/convert_in1k.py (ImageFolder order, no resize), then the
    JPEG of sample `corrupt` cut after its headers (zeros, as a bad sector reads)."""
    import contextlib
    import io

    from pipelines.convert import beton as layout
    from pipelines.convert.convert import convert
    from pipelines.convert.options import make_options

    opts = make_options(src=root, dst=out, formats="ffcv", splits="train", max_resolution=256,
                        train_order="source", num_workers=0)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(opts)
    path = os.path.join(out, "train.beton")
    data = bytearray(open(path, "rb").read())
    header = np.frombuffer(bytes(data[:layout.HEADER_TYPE.itemsize]), layout.HEADER_TYPE)
    table = np.frombuffer(bytes(data[int(header["alloc_table_ptr"][0]):]),
                          layout.ALLOC_TABLE_TYPE)
    entry = table[table["sample_id"] == corrupt][0]
    start, size = int(entry["ptr"]), int(entry["size"])
    data[start + size // 3:start + size] = bytes(size - size // 3)
    open(path, "wb").write(bytes(data))
    return path


def test_a_corrupt_jpeg_is_counted_and_replaced_with_its_label(tmp_path, no_jit):
    """Issue #26: the decoder's failure is no longer ignored. The corrupt sample becomes a
    copy of another sample of its batch, pixels and label together, and is counted."""
    from torchvision.datasets import ImageFolder

    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    from trex_fast.data import epoch_data_counts

    corrupt, root = 5, str(tmp_path / "src")
    demo_data.write_dataset(root, train_per_class=3, val_per_class=1)  # 8 classes, 24 images
    beton = _converted_with_one_corrupt_jpeg(root, str(tmp_path / "conv"), corrupt)
    images = _reference_images(root, "train")
    labels_of = [y for _, y in ImageFolder(os.path.join(root, "train")).samples]
    data = FfcvTrainData(beton, SPEC, _settings(8))
    order = [i for _, i in data.sampler]
    rows = 0
    for step, (packed, sizes, labels) in enumerate(data.decoded(0)):
        canvas = unpack_canvas(packed, sizes, *data.canvas_shape[:2])
        for row in range(len(labels)):
            index = order[step * 8 + row]
            h, w = sizes[row].tolist()
            shown = canvas[row, :h, :w].numpy().astype(float)
            # the image in the row is some sample's, and the row's label is that sample's
            match = [i for i, im in enumerate(images) if im.shape[:2] == (h, w)
                     and np.abs(shown - im).mean() < 3.0]
            assert match and labels_of[match[0]] == int(labels[row])
            assert (match[0] == index) == (index != corrupt)
            rows += 1
    assert rows == len(images) and data.corrupt_images == 1
    # what the epoch's record in metrics.jsonl gets (train.py's end of epoch)
    assert epoch_data_counts(data, torch.device("cpu")) == {"corrupt_images": 1}
    assert epoch_data_counts(object(), torch.device("cpu")) == {}  # pipelines that stop
