"""SGD with weight-decay groups by tensor shape, and the per-iteration LR schedule.

RECIPE.md "Optimisation": SGD momentum 0.9 (no Nesterov), base LR 0.1 per 256 images scaled
linearly with the global batch, linear warm-up from 0 then cosine to min_lr, weight decay
1e-4 only on tensors with ndim >= 2 (never biases or BN gammas/betas).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from trex_fast.config import Config


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay for ndim >= 2 tensors, none for the rest: by shape, never by name."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    # lr is set every step by the schedule; 0 here so nothing runs at an unscheduled LR.
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=0.0,
                           momentum=cfg.momentum, nesterov=False)


@dataclass(frozen=True)
class LRSchedule:
    """lr(step) for step in [0, total_steps): 0 -> peak linearly over warmup_steps, then a
    cosine that reaches min_lr exactly at the last step (total_steps - 1)."""

    peak_lr: float  # already scaled by global batch / 256
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def from_plan(cls, cfg: Config, plan) -> LRSchedule:
        """The schedule of a run plan (trex_fast.plan), which scales the LR and counts steps."""
        return cls(peak_lr=plan.peak_lr, min_lr=cfg.min_lr, warmup_steps=plan.warmup_steps,
                   total_steps=plan.total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        decay_steps = max(self.total_steps - 1 - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
