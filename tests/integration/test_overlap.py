"""pipelines/stage/overlap.py: the look-ahead keeps batches and their order; the prefix copy moves
only the used bytes of each packed row and the canvases do not change."""
import os

import pytest
import torch

from pipelines import demo_data
from pipelines.batch import MultiCropBatch
from pipelines.stage.overlap import PinnedPrefixCopy, overlapped, packed_prefix_bytes
from pipelines.stage.torch_spec import unpack_canvas
from tests.helpers import run_in_spawned_process
from tests.integration import test_ffcv_multicrop as ffcv_tests
from trex_fast.measure.costcount import Transfer, count_cost

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _fake_stage(log, device="cpu"):
    def device_fn(item):
        log.append(("issue", item))
        side = 128 if device == "cuda" else 16  # enough work to race if the wait were missing
        crops = torch.full((64, 3, side, side), float(item), device=device)
        for _ in range(3):
            crops = (crops @ crops.transpose(-1, -2)).clamp(max=1e3) / 1e3 + item
        return MultiCropBatch(crops, torch.zeros(0, 3, 2, 2, device=device),
                              torch.full((2,), item, device=device))
    return device_fn


@pytest.mark.parametrize("device", DEVICES)
def test_overlapped_yields_the_inline_batches_in_order(device):
    log = []
    inline = [_fake_stage([], device)(i) for i in range(5)]
    for k, batch in enumerate(overlapped(range(5), _fake_stage(log, device), device)):
        log.append(("yield", k))
        assert torch.equal(batch.global_crops, inline[k].global_crops)
        assert torch.equal(batch.labels, inline[k].labels)
    # batch k+1's work is issued before batch k is handed over; nothing is dropped
    assert log == [("issue", 0), ("issue", 1), ("yield", 0), ("issue", 2), ("yield", 1),
                   ("issue", 3), ("yield", 2), ("issue", 4), ("yield", 3), ("yield", 4)]


@pytest.mark.parametrize("n", [0, 1])
def test_overlapped_handles_short_inputs(n):
    assert [b.labels[0].item() for b in overlapped(range(n), _fake_stage([]), "cpu")] == \
        list(range(n))


def test_early_stop_issues_at_most_one_batch_ahead():
    log = []
    stream = overlapped(iter(range(10)), _fake_stage(log), "cpu")
    next(stream)
    stream.close()
    assert [e for e in log if e[0] == "issue"] == [("issue", 0), ("issue", 1)]


def _packed(sizes, hmax, wmax, seed=0):
    """Packed rows as FFCV's CanvasDecoder writes them, with garbage past each image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (len(sizes), hmax * wmax * 3), dtype=torch.uint8,
                         generator=g)


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_copy_moves_the_used_bytes_and_keeps_the_canvases(device):
    sizes = torch.tensor([[3, 2], [5, 4], [1, 7]], dtype=torch.int32)
    packed = _packed(sizes, 6, 8)
    used = packed_prefix_bytes(sizes)
    assert used == 5 * 4 * 3  # the largest image of the batch, not the 6x8 slot
    copy = PinnedPrefixCopy(device)
    before = packed.clone()
    moved = copy(packed, used)
    assert moved.device.type == device
    assert copy.staging[0].is_pinned() == (device == "cuda")
    assert copy.last_bytes == 3 * used < packed.numel()
    assert torch.equal(moved[:, :used].cpu(), packed[:, :used])
    assert torch.equal(packed, before)  # the loader's buffer is only read
    assert torch.equal(unpack_canvas(moved, sizes, 6, 8).cpu(),
                       unpack_canvas(packed, sizes, 6, 8))
    copy(packed, 6)
    assert copy.last_bytes == 18 and copy.total_bytes == 3 * used + 18
    assert len(copy.staging) == 2  # reused round-robin from here on
    first_buffer = copy.staging[0].data_ptr()
    third = copy(packed, used)
    assert copy.staging[0].data_ptr() == first_buffer and len(copy.staging) == 2
    assert torch.equal(third[:, :used].cpu(), packed[:, :used])


def test_prefix_copy_makes_one_contiguous_async_copy_and_no_slot_sized_host_buffer():
    """Counted on the CPU with "meta" standing in for the GPU (a device whose memory is not the
    host's): each batch crosses to the device as one contiguous, non_blocking copy of exactly
    B x used bytes (a strided one would go through a pageable temporary and a blocking copy on
    CUDA), and the host allocates only the reused staging buffers, never B x slot bytes."""
    sizes = [torch.tensor(s, dtype=torch.int32) for s in
             ([[3, 2], [5, 4], [1, 7]], [[2, 2], [5, 4], [4, 3]], [[6, 5], [1, 1], [2, 2]],
              [[3, 2], [5, 4], [1, 7]], [[3, 3], [2, 2], [1, 1]])]
    packed = _packed(sizes[0], 6, 8)  # [3, 144]: the loader's reused host rows
    copy = PinnedPrefixCopy("meta")
    per_batch = []
    for batch_sizes in sizes:
        used = packed_prefix_bytes(batch_sizes)
        with count_cost() as cost:
            moved = copy(packed, used)
        per_batch.append((used, cost.transfers, cost.host_allocations))
        assert moved.shape == packed.shape and moved.device.type == "meta"
    assert [used for used, _, _ in per_batch] == [60, 60, 90, 60, 27]
    for used, transfers, _ in per_batch:
        assert transfers == [Transfer("cpu", "meta", 3 * used, contiguous=True,
                                      non_blocking=True)]
    # two staging buffers of 3 x 60 bytes, the first grown once to 3 x 90; then none
    assert [alloc for _, _, alloc in per_batch] == [[180], [180], [270], [], []]
    assert copy.total_bytes == 3 * (60 + 60 + 90 + 60 + 27)


def test_prefix_copy_waits_for_a_buffers_last_copy_before_refilling_it():
    """On CUDA the copy out of a staging buffer may still run when the host comes back to it:
    the buffer is refilled only after that copy's event (faked here) has been waited for."""
    sizes = torch.tensor([[3, 2], [5, 4], [1, 7]], dtype=torch.int32)
    first, second = _packed(sizes, 6, 8, seed=1), _packed(sizes, 6, 8, seed=2)
    used = packed_prefix_bytes(sizes)
    copy, waits = PinnedPrefixCopy("cpu"), []

    class InFlight:
        def synchronize(self):  # what the buffer holds when the host waits
            waits.append(copy.staging[0][:3 * used].clone())

    copy(first, used)
    copy.copied[0] = InFlight()  # as if buffer 0's copy to the device had not finished
    copy(second, used)  # buffer 1: nothing to wait for
    assert waits == []
    third = copy(second, used)  # buffer 0 again
    assert len(waits) == 1 and torch.equal(waits[0].view(3, used), first[:, :used])
    assert copy.copied[0] is None and torch.equal(third[:, :used], second[:, :used])


def test_prefix_copy_rejects_a_prefix_past_the_row():
    with pytest.raises(ValueError, match="slot"):
        PinnedPrefixCopy("cpu")(torch.zeros(2, 10, dtype=torch.uint8), 11)


def _write_train_beton(root: str) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField()}
    DatasetWriter(os.path.join(root, "train.beton"), fields, num_workers=1
                  ).from_indexed_dataset(ImageFolder(os.path.join(root, "train")))


@pytest.fixture(scope="module")
def beton_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("overlap_beton"))
    demo_data.write_dataset(root, train_per_class=3, val_per_class=0)
    run_in_spawned_process(_write_train_beton, root)  # before any Loader runs here
    return root


@pytest.mark.ffcv
def test_ffcv_epoch_with_overlap_yields_the_same_batches(beton_root, no_jit):
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData

    data = FfcvTrainData(os.path.join(beton_root, "train.beton"), ffcv_tests.SPEC,
                         ffcv_tests._settings(4))
    # the batches as epoch() made them before the overlap: one after the other, inline
    inline, prefix_bytes = [], 0
    for step, (packed, sizes, labels) in enumerate(data.decoded(1)):
        canvas = unpack_canvas(packed, sizes, *data.canvas_shape[:2])
        inline.append(data.stage(canvas, sizes, labels.clone(), 1, step))
        prefix_bytes += 4 * packed_prefix_bytes(sizes)
    batches = list(data.epoch(1))
    assert len(batches) == len(inline) == data.steps_per_epoch
    for got, want in zip(batches, inline):
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(got.global_crops, want.global_crops)
        assert torch.equal(got.local_crops, want.local_crops)
    slot_bytes = data.steps_per_epoch * 4 * data.canvas_shape[0] * data.canvas_shape[1] * 3
    assert data.host_to_device.total_bytes == prefix_bytes < slot_bytes
