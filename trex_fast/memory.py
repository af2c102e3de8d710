"""Memory bank of EMA features and the EMA network (RECIPE.md "Classifier": OCM).

The memory is a FIFO of `size` raw (un-normalised) EMA-projector outputs with their labels,
shared by all classes. Class prototypes are the L2-normalised per-class SUMS of the stored
raw vectors; a class absent from the memory has a zero prototype (logit 0).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from trex_fast import distributed


class MemoryBank(nn.Module):
    """FIFO of features [size, dim] (fp32) and labels [size] with a pointer [] (all buffers,
    so they are checkpointed with the state_dict and moved with .to())."""

    def __init__(self, size: int, dim: int, num_classes: int, generator=None):
        super().__init__()
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.num_classes = num_classes
        # Initial content (RECIPE.md): standard-normal features, uniformly random labels.
        self.register_buffer("features", torch.randn(size, dim, generator=generator))
        self.register_buffer("labels", torch.randint(0, num_classes, (size,), generator=generator))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def class_prototypes(self) -> torch.Tensor:
        """[C, dim]: normalised sums of each class's raw stored vectors; zero rows if absent."""
        sums = torch.zeros(self.num_classes, self.features.shape[1],
                           device=self.features.device, dtype=torch.float32)
        sums.index_add_(0, self.labels, self.features.float())
        return F.normalize(sums, dim=1)  # a zero row stays zero (norm clamped at eps)

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write a batch at the pointer, gathering it from every rank first when distributed.

        If the batch would pass the end, the part past the end is dropped (not wrapped) and the
        pointer returns to 0; otherwise it advances by n (mod size). Written with a masked
        select over the slots so the pointer never has to be read on the host.
        """
        features = distributed.all_gather_cat(features.detach().float())  # [n, dim]
        labels = distributed.all_gather_cat(labels)  # [n]
        n = features.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} features into a memory of {self.size} slots")
        slots = torch.arange(self.size, device=self.features.device)
        offset = slots - self.ptr  # position of each slot inside the incoming batch
        take = (offset >= 0) & (offset < n)  # [size]
        src = offset.clamp(0, n - 1)
        self.features.copy_(torch.where(take[:, None], features[src], self.features))
        self.labels.copy_(torch.where(take, labels[src], self.labels))
        end = self.ptr + n
        self.ptr.copy_(torch.where(end >= self.size, torch.zeros_like(end), end))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.features.shape[1]}, num_classes={self.num_classes}"


def make_ema(online: nn.Module) -> nn.Module:
    """An exact copy that never gets gradients; kept in train mode (batch-statistics BN)."""
    ema = copy.deepcopy(online)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema.train()


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """ema = momentum * ema + (1 - momentum) * online, parameters only (buffers are the EMA
    network's own BN statistics), as one fused foreach op."""
    ema_params = list(ema.parameters())
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(ema_params, online_params, 1.0 - momentum)
