"""The epoch loop around train_step: progress, metric reads, stops, checkpoints.

The loop reads the on-device metrics every `log_every` steps and at the epoch's last step (the
only host sync of the hot path) and stops with a clear error there if the loss is not finite,
before any checkpoint can record the bad weights. The same read carries what the ranks must
agree on: whether the checkpoint clock is due and whether any rank got a stop signal (issue
#15), so every rank checkpoints and stops at the same step, and agreeing costs no extra sync.
SIGTERM/SIGINT (alone: after the current step; under DDP: at the next metric read) and
--stop_at_step end the loop with a checkpoint that continues exactly where it stopped.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import torch

from trex_fast import distributed, runlog
from trex_fast.checkpoint import left_behind
from trex_fast.step import TrainState, train_step


class NonFiniteLossError(RuntimeError):
    """The training loss is inf or NaN; the message says which checkpoint the run leaves."""


class SecondSignal(KeyboardInterrupt):
    """A second SIGTERM/SIGINT: exit now without saving, with code 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag (a second signal raises SecondSignal). Alone, the loop
    stops after the step it is in; under DDP a signal may reach one rank only, or the ranks at
    different steps, so they stop where a metric read has agreed on it (`agreed`), all at one
    step."""

    def __init__(self):
        self.received: int | None = None  # the signal this process got
        self.agreed: int | None = None  # the largest signal any rank had at the last read
        self._previous = {}

    def requested(self) -> int | None:
        """The signal to stop for now, the same on every rank."""
        return self.agreed if distributed.is_distributed() else self.received

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: give up saving
            signal.signal(signum, self._previous[signum])
            raise SecondSignal(signum)
        self.received = signum
        when = ("at the next metric read (within --log_every steps), with every rank"
                if distributed.is_distributed() else "after this step")
        print(f"\n[trex_fast] got {signal.Signals(signum).name}: saving a checkpoint {when}, "
              "then exiting (send it again to exit without saving)", flush=True)

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
            runlog.TRAIN_LOSS: s["loss_sum"] / (steps * world),
            runlog.TRAIN_TOP1: 100.0 * s["correct"] / max(s["rows"], 1),
            runlog.TRAIN_GLOBAL_TOP1: 100.0 * s["global_correct"] / max(s["images"], 1),
            runlog.SAMPLES_PER_S: s["images"] / max(self.train_seconds, 1e-9),
        }


def check_finite(read: dict, step: int, checkpoint_path: str) -> None:
    mean_loss = read["loss_sum"] / max(read["steps"], 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"the training loss became non-finite ({mean_loss}) within the {read['steps']} steps "
            f"before global step {step}; stopped without saving: {left_behind(checkpoint_path)}. "
            "Try a lower --lr, --precision=fp32, or check the data.")


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


def read_metrics(state: TrainState, totals: EpochTotals, stop: StopSignal,
                 clock: CheckpointClock | None, checkpoint_path: str) -> tuple[dict, bool]:
    """The loop's metric read: adds the sums to totals, checks the loss, and returns (the sums,
    whether a clock checkpoint is due); sets stop.agreed. Under DDP both decisions are the
    maximum over the ranks, all-reduced on the device and read in the metrics' own copy: one
    host sync."""
    due = clock is not None and clock.due()
    local = [int(due), stop.received or 0]
    agreed = distributed.agree_max(local, state.device)
    read, extra = state.metrics.read_and_reset(agreed)  # host sync, every log_every steps only
    due, signum = (int(v) for v in extra) if agreed is not None else local
    stop.agreed = signum or None
    check_finite(read, state.step, checkpoint_path)
    totals.add(read)
    return read, bool(due)


def train_one_epoch(state: TrainState, train_data, epoch: int, start_step: int,
                    progress, stop: StopSignal, checkpoint_path: str,
                    totals: EpochTotals | None = None, clock: CheckpointClock | None = None,
                    on_checkpoint=None) -> EpochOutcome:
    """totals: the sums of this epoch's steps before start_step (a mid-epoch resume);
    on_checkpoint(step_in_epoch, totals): called where the ranks agreed that the clock is due,
    right after a metric read inside the epoch (the epoch end has its own checkpoint)."""
    cfg = state.cfg
    totals = totals or EpochTotals()
    steps = train_data.steps_per_epoch
    step_in_epoch = start_step
    start = time.perf_counter()
    for batch in train_data.epoch(epoch, start_step):
        train_step(state, batch)
        step_in_epoch += 1
        if progress is not None:
            progress.update(1)
        if state.metrics.steps >= cfg.log_every or step_in_epoch == steps:
            read, due = read_metrics(state, totals, stop, clock, checkpoint_path)
            if progress is not None:
                progress.set_postfix(epoch=epoch + 1, **_shown(read))
            if due and step_in_epoch < steps and on_checkpoint is not None:
                on_checkpoint(step_in_epoch, totals)
        if stop.requested() is not None or state.step == cfg.stop_at_step:
            break
    if state.metrics.steps:  # stopped between reads (alone, or --stop_at_step)
        read, _ = state.metrics.read_and_reset()
        check_finite(read, state.step, checkpoint_path)
        totals.add(read)
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    totals.train_seconds += time.perf_counter() - start
    finished = step_in_epoch >= steps
    return EpochOutcome(totals, None if finished else step_in_epoch)


def _shown(read: dict) -> dict:
    return {"loss": f"{read['loss_sum'] / max(read['steps'], 1):.3f}",
            "top1": f"{100 * read['correct'] / max(read['rows'], 1):.1f}%"}
