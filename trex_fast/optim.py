"""SGD (or AdamW) with weight-decay groups, and the per-iteration LR schedule.

RECIPE.md "Optimisation": SGD momentum 0.9 (no Nesterov), base LR 0.1 per 256 images scaled
linearly with the global batch, linear warm-up from 0 then cosine to min_lr, weight decay
1e-4 only on tensors with ndim >= 2 (never biases or BN gammas/betas). The groups go by shape;
a backbone may add parameters the registry names (trex_fast.models.registry: a ViT's position
embedding and class token, ndim 3, are never decayed). For a ResNet that set is empty, so its
groups are the recipe's. AdamW (the ViT presets, docs/VIT.md) uses the same groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from trex_fast.config import Config
from trex_fast.models.registry import no_decay

ADAMW_BETAS = (0.9, 0.999)  # DINO's and DeiT's


def param_groups(model: nn.Module, weight_decay: float,
                 undecayed: frozenset[str] = frozenset()) -> list[dict]:
    """Decay for ndim >= 2 tensors, none for the rest: by shape; `undecayed` adds parameters
    (by their names in `model`) that the backbone registry keeps from decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keep = [p.ndim < 2 or n in undecayed for n, p in named]
    return [
        {"params": [p for (_, p), k in zip(named, keep) if not k], "weight_decay": weight_decay},
        {"params": [p for (_, p), k in zip(named, keep) if k], "weight_decay": 0.0},
    ]


def undecayed_params(model: nn.Module, arch: str) -> frozenset[str]:
    """The names in `model` (a MultiCropNet) of the backbone parameters the registry keeps from
    weight decay; the projector and classifier go by shape alone."""
    return frozenset(f"backbone.{n}" for n in no_decay(arch, model.backbone))


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, undecayed_params(model, cfg.arch))
    # lr is set every step by the schedule; 0 here so nothing runs at an unscheduled LR.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=ADAMW_BETAS)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=False)


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
