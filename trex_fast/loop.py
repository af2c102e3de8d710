"""The epoch loop around train_step: progress, metric reads, stops, checkpoints.

The loop reads the on-device metrics every `log_every` steps (the only host sync of the hot
path) and stops with a clear error there if the loss is not finite, before any checkpoint can
record the bad weights. SIGTERM/SIGINT and --stop_at_step end the loop after the current step
with a checkpoint that continues exactly where it stopped.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import torch

from trex_fast import distributed
from trex_fast.step import TrainState, train_step


class NonFiniteLossError(RuntimeError):
    pass


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked after each step (a second signal kills)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: give up saving
            signal.signal(signum, self._previous[signum])
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n[trex_fast] got {signal.Signals(signum).name}: saving a checkpoint after this "
              "step, then exiting (send it again to exit without saving)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class EpochTotals:
    """Host-side sums of the metric reads of one epoch."""

    sums: dict = field(default_factory=lambda: dict.fromkeys(
        ("loss_sum", "correct", "global_correct", "rows", "images", "steps"), 0))
    train_seconds: float = 0.0

    def add(self, read: dict) -> None:
        for key, value in read.items():
            self.sums[key] += value

    def summary(self) -> dict:
        """Averages over all ranks (one all-reduce, once per epoch)."""
        keys = list(self.sums)
        t = torch.tensor([float(self.sums[k]) for k in keys], dtype=torch.float64)
        if distributed.is_distributed():
            backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            t = distributed.all_reduce_sum(t.to(backend_device)).cpu()
        s = dict(zip(keys, t.tolist()))
        world = torch.distributed.get_world_size() if distributed.is_distributed() else 1
        steps = max(s["steps"] / world, 1)
        return {
            "train_loss": s["loss_sum"] / (steps * world),
            "train_top1": 100.0 * s["correct"] / max(s["rows"], 1),
            "train_global_top1": 100.0 * s["global_correct"] / max(s["images"], 1),
            "samples_per_s": s["images"] / max(self.train_seconds, 1e-9),
        }


def check_finite(read: dict, step: int, checkpoint_path: str) -> None:
    mean_loss = read["loss_sum"] / max(read["steps"], 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"the training loss became non-finite ({mean_loss}) within the {read['steps']} steps "
            f"before global step {step}; stopped without saving, so the last good checkpoint "
            f"({checkpoint_path}) is intact. Try a lower --lr, --precision=fp32, or check the "
            "data.")


@dataclass
class EpochOutcome:
    totals: EpochTotals
    stopped_at: int | None  # step inside the epoch where a stop request ended it, else None


class CheckpointClock:
    """Due once `minutes` have passed since the last checkpoint (0 = never); asked only at a
    metric read, which has just synchronised with the device, so it adds no host sync."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()


def train_one_epoch(state: TrainState, train_data, epoch: int, start_step: int,
                    progress, stop: StopSignal, checkpoint_path: str,
                    totals: EpochTotals | None = None, on_read=None) -> EpochOutcome:
    """totals: the sums of this epoch's steps before start_step (a mid-epoch resume);
    on_read(step_in_epoch, totals): called after each metric read (the clock checkpoint)."""
    cfg = state.cfg
    totals = totals or EpochTotals()
    step_in_epoch = start_step
    start = time.perf_counter()
    for batch in train_data.epoch(epoch, start_step):
        train_step(state, batch)
        step_in_epoch += 1
        if progress is not None:
            progress.update(1)
        if state.metrics.steps >= cfg.log_every:
            read = state.metrics.read_and_reset()  # host sync, every log_every steps only
            check_finite(read, state.step, checkpoint_path)
            totals.add(read)
            if progress is not None:
                progress.set_postfix(epoch=epoch + 1,
                                     loss=f"{read['loss_sum'] / read['steps']:.3f}",
                                     top1=f"{100 * read['correct'] / read['rows']:.1f}%")
            if on_read is not None and step_in_epoch < train_data.steps_per_epoch:
                on_read(step_in_epoch, totals)
        if stop.received is not None or state.step == cfg.stop_at_step:
            break
    if state.metrics.steps:
        read = state.metrics.read_and_reset()
        check_finite(read, state.step, checkpoint_path)
        totals.add(read)
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    totals.train_seconds += time.perf_counter() - start
    finished = step_in_epoch >= train_data.steps_per_epoch
    return EpochOutcome(totals, None if finished else step_in_epoch)
