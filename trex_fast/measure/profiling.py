"""Where a training step's time goes, without a host sync inside the step.

A PhaseTimer records a CUDA event (on CPU a host timestamp, CPU work being synchronous) at each
phase boundary of train_step; read() synchronises once and returns milliseconds per phase,
summed over the steps recorded since the last read.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch


def timed(device: torch.device, fn) -> float:
    """Seconds that fn() takes on `device`: CUDA events around it and one sync at the end on a
    GPU, the host clock elsewhere (CPU work is synchronous). For the benchmark scripts."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class PhaseTimer:
    """train_step's `timer`: marks its phase boundaries (trex_fast.step.NULL_TIMER is the no-op)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        """The end of phase `name` (the start of a step is the mark named 'start')."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((name, event))
        else:
            self._marks.append((name, time.perf_counter()))

    def read(self) -> dict[str, float]:
        """Host sync: {phase: milliseconds summed over the recorded steps}; then resets."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        for (_, t0), (name, t1) in zip(self._marks, self._marks[1:]):
            if name == "start":  # the gap between two steps belongs to no phase
                continue
            totals[name] += t0.elapsed_time(t1) if self.cuda else 1000.0 * (t1 - t0)
        self._marks.clear()
        return dict(totals)
