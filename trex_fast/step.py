"""The training state and the training step, in RECIPE.md's order.

No host-device synchronisation happens inside train_step (with bf16/fp32; fp16's GradScaler
reads its inf flag on the host): metrics accumulate on the device and are read by the loop
every `log_every` steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pipelines.batch import MultiCropBatch
from trex_fast.config import Config
from trex_fast.kernels.dispatch import prototype_ce_with_top1
from trex_fast.memory import MemoryBank, ema_update
from trex_fast.models.net import MultiCropNet
from trex_fast.optim import LRSchedule, set_lr
from trex_fast.plan import RunPlan


@dataclass
class StepMetrics:
    """On-device running sums since the last read; read() is the one host sync."""

    device: torch.device
    loss_sum: torch.Tensor = None  # [] fp32, sum over steps of the mean loss
    correct: torch.Tensor = None  # [] int64, top-1 hits over all crops
    global_correct: torch.Tensor = None  # [] int64, top-1 hits over global crop 0
    rows: int = 0  # host-side counts: shapes are known without a sync
    images: int = 0
    steps: int = 0

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.global_correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.rows = self.images = self.steps = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, batch_size: int) -> None:
        self.loss_sum += loss.detach().float()
        self.correct += correct.sum()
        self.global_correct += correct[:batch_size].sum()
        self.rows += correct.shape[0]
        self.images += batch_size
        self.steps += 1

    def read_and_reset(self, extra: torch.Tensor | None = None) -> tuple[dict, list[float]]:
        """The one host sync: (the sums since the last read as Python numbers, the values of
        `extra`). extra: a small device tensor the caller wants read in the same copy (the
        loop's flags agreed across ranks), so that reading it costs no second sync."""
        device_sums = torch.stack([self.loss_sum.double(), self.correct.double(),
                                   self.global_correct.double()])  # [3], exact: counts < 2^53
        if extra is not None:
            device_sums = torch.cat([device_sums, extra.double()])
        loss_sum, correct, global_correct, *extra_values = device_sums.tolist()  # host sync
        sums = {"loss_sum": loss_sum, "correct": int(correct),
                "global_correct": int(global_correct), "rows": self.rows,
                "images": self.images, "steps": self.steps}
        self.reset()
        return sums, extra_values


@dataclass
class TrainState:
    cfg: Config
    plan: RunPlan  # the run's resolved facts (trex_fast.plan)
    online: MultiCropNet  # the online network, unwrapped (checkpoints, EMA source, eval)
    online_ddp: nn.Module  # its DDP wrapper, what the step calls (online itself when alone;
    #                        torch.compile'd with --compile)
    ema: MultiCropNet | None  # None for the plain preset (no memory to fill)
    memory: MemoryBank | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    step: int = 0  # global optimisation steps done
    metrics: StepMetrics = field(default=None)

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = StepMetrics(self.device)

    # the plan is their one home; the step reads them often
    @property
    def device(self) -> torch.device:
        return self.plan.torch_device

    @property
    def precision(self) -> str:  # bf16 | fp16 | fp32
        return self.plan.precision

    @property
    def loss_impl(self) -> str:  # torch | triton
        return self.plan.loss_impl

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.plan.dtype)

    def class_weight(self) -> torch.Tensor:
        """[C, D]: memory prototypes (no grad) or the cosine classifier's weight."""
        if self.memory is not None:
            return self.memory.class_prototypes()
        return self.online.classifier.weight


class NullTimer:
    """train_step's default timer: its phase marks cost nothing (trex_fast.measure.profiling's
    PhaseTimer records them)."""

    def mark(self, name: str) -> None:
        pass


NULL_TIMER = NullTimer()


def train_step(state: TrainState, batch: MultiCropBatch, timer=NULL_TIMER) -> None:
    """One optimisation step. `timer` (trex_fast.measure.profiling) marks the phase boundaries."""
    cfg = state.cfg
    timer.mark("start")
    set_lr(state.optimizer, state.schedule(state.step))
    batch_size = batch.batch_size
    crops_per_image = cfg.global_crops + cfg.local_crops

    # (1) class prototypes from the memory as it is before this step: the current batch is
    #     never in the memory when its own loss is computed.
    class_weight = state.class_weight()  # [C, D]
    timer.mark("prototypes")

    with state.autocast():
        # (2) online forward: one backbone pass per resolution group, projector over all crops.
        z = state.online_ddp(batch.global_crops, batch.local_crops)  # [(G+L)*B, D], crop-major
        # (3) cross-entropy over every crop, each weighted equally; labels repeated per crop.
        labels = batch.labels.repeat(crops_per_image)  # [(G+L)*B]
        loss, correct = prototype_ce_with_top1(z, class_weight, labels, cfg.clf_tau,
                                               state.loss_impl)
    timer.mark("forward+loss")

    if state.memory is not None:
        # (4) EMA update from the online weights as they are before this step's optimiser step.
        ema_update(state.ema, state.online, cfg.ema_momentum)
        # (5) EMA forward on global crop 0 (train-mode BN), gather from all ranks, enqueue.
        with torch.no_grad(), state.autocast():
            ema_z = state.ema.embed(batch.global_crops[:batch_size])  # [B, D]
        state.memory.enqueue(ema_z, batch.labels)
    timer.mark("ema+enqueue")

    # (6) backward and the optimiser step (the LR was set from the schedule above).
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.clip_grad:  # off in the recipe; the ViT presets clip (docs/VIT.md)
        state.scaler.unscale_(state.optimizer)  # fp16: clip the true gradients
        # foreach kernels, the norm stays on the device: no host sync
        nn.utils.clip_grad_norm_(state.online.parameters(), cfg.clip_grad)
    timer.mark("backward")
    state.scaler.step(state.optimizer)
    state.scaler.update()
    timer.mark("optimizer")
    state.step += 1
    state.metrics.add(loss, correct, batch_size)
