"""Overlap a pipeline's device stage with the training step (issue 14, item 14).

`overlapped(items, device_fn, device)` yields device_fn(item) for each item, in order, and
issues the work of item k+1 before result k is handed to the consumer. On CUDA that work runs
on a side stream, so batch k+1's host-to-device copy and multi-crop stage overlap step k:

    side stream:     copy+stage(k+1)          copy+stage(k+2)
    consumer stream:           ^wait(k)  step(k)        ^wait(k+1)  step(k+1)

The consumer's stream waits on an event recorded after result k was made (a device-side wait,
no host sync), and every tensor of result k is `record_stream`ed to the consumer's stream, so
the caching allocator does not hand its memory back to the side stream while the step still
reads it. On the CPU there are no streams; the same look-ahead runs inline.

`PinnedPrefixCopy` moves FFCV's packed decode rows (image b's h*w*3 bytes first in row b) to
the device: only the prefix of the rows that the batch's largest image uses, gathered on the host
into a contiguous pinned buffer, so that the copy is one asynchronous memcpy (issue 22, item 9).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch


def _tensors(value) -> Iterator[torch.Tensor]:
    """Every tensor inside a result: tensors, dataclasses (MultiCropBatch), tuples, dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def overlapped(items: Iterable, device_fn: Callable, device: torch.device | str) -> Iterator:
    """device_fn(item) per item, in order; item k+1's work is issued before result k is
    yielded (on a side CUDA stream on CUDA, inline elsewhere). device_fn must take what it
    needs from the item before the next item is drawn (loaders reuse their host buffers)."""
    device = torch.device(device)
    side = None
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        # once: device tensors made before the loop (tables, weights) are ready for the stage
        side.wait_stream(torch.cuda.current_stream(device))

    def issue(item):
        if side is None:
            return device_fn(item), None
        with torch.cuda.stream(side):
            result = device_fn(item)
            ready = torch.cuda.Event()
            ready.record(side)
        return result, ready

    def hand_over(result, ready):
        if ready is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(ready)  # device-side wait: the host goes on
            for t in _tensors(result):
                if t.device.type == "cuda":
                    t.record_stream(consumer)
        return result

    iterator = iter(items)
    pending = None
    for item in iterator:
        issued = issue(item)
        if pending is not None:
            yield hand_over(*pending)
        pending = issued
    if pending is not None:
        yield hand_over(*pending)


def packed_prefix_bytes(sizes: torch.Tensor) -> int:
    """Bytes of each packed row that hold pixels for the batch's largest image: max h*w*3.
    sizes [B, >=2] (height, width) on the CPU, read with numpy (host data, no device op)."""
    hw = sizes[:, :2].numpy().astype(np.int64)
    return int((hw[:, 0] * hw[:, 1]).max()) * 3 if len(hw) else 0


class PinnedPrefixCopy:
    """Packed rows [B, slot] uint8 on the host -> [B, slot] on `device`, moving only the first
    `used` bytes of each row. Bytes past `used` in the result are undefined: unpack_canvas and
    the stage read row b only below h_b*w_b*3.

        packed[:, :used] --host memcpy--> staging [B, used], contiguous, pinned on CUDA
                         --one copy, non_blocking--> [B, used] on the device
                         --device copy--> the first `used` bytes of each [B, slot] row

    Copying the strided view packed[:, :used] straight to the device would not do: torch
    stages a non-contiguous host tensor through a fresh pageable contiguous temporary (the
    size of the prefix, every batch) and a blocking copy, whatever non_blocking says.

    `depth` staging buffers are reused round-robin and grown when a batch needs more bytes;
    before one is refilled, the host waits for the copy that last read it (issued depth batches
    earlier, so normally long done). `last_bytes` is the bytes the last call moved to the
    device, `total_bytes` their sum.
    """

    def __init__(self, device: torch.device | str, depth: int = 2):
        self.device = torch.device(device)
        self.depth = depth
        self.staging: list[torch.Tensor] = []  # flat uint8 buffers, one per turn
        self.copied: list[torch.cuda.Event | None] = []  # the last copy out of each buffer
        self.turn = 0
        self.last_bytes = self.total_bytes = 0

    def _staging(self, nbytes: int) -> int:
        """The index of the next buffer, free to overwrite and holding at least nbytes."""
        i, self.turn = self.turn, (self.turn + 1) % self.depth
        if i == len(self.staging):
            self.staging.append(None)
            self.copied.append(None)
        if self.copied[i] is not None:
            self.copied[i].synchronize()  # host wait: that copy is depth batches old
            self.copied[i] = None
        if self.staging[i] is None or self.staging[i].numel() < nbytes:
            self.staging[i] = torch.empty(nbytes, dtype=torch.uint8,
                                          pin_memory=self.device.type == "cuda")
        return i

    def __call__(self, packed: torch.Tensor, used: int) -> torch.Tensor:
        if packed.dtype != torch.uint8 or packed.ndim != 2 or not 0 <= used <= packed.shape[1]:
            raise ValueError(f"packed must be uint8 [B, slot >= {used}], got {packed.dtype} "
                             f"{tuple(packed.shape)}")
        b = packed.shape[0]
        i = self._staging(b * used)
        staging = self.staging[i][:b * used].view(b, used)  # [B, used], contiguous
        staging.copy_(packed[:, :used])  # host memcpy: the loader may reuse packed
        moved = staging.to(self.device, non_blocking=True)  # [B, used] on the device
        if self.device.type == "cuda":
            self.copied[i] = torch.cuda.Event()
            self.copied[i].record()  # on the current stream, the one the copy was issued on
        out = torch.empty(packed.shape, dtype=torch.uint8, device=self.device)  # [B, slot]
        out[:, :used].copy_(moved)  # on the device (on the CPU, out of the reused staging)
        self.last_bytes = b * used
        self.total_bytes += self.last_bytes
        return out
