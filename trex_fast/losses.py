"""Prototype-similarity cross-entropy: the plain-torch reference (RECIPE.md, "Classifier").

logits = normalize(z) @ normalize(W).T / tau, then mean cross-entropy over the rows. W is
either the class prototypes of the memory bank (no gradient) or the weight of the plain
preset's learned cosine classifier (gets a gradient). A zero row of W (a class absent from
the memory) stays zero under the normalisation, so its logit is exactly 0.

This file is the specification that the fused Triton kernel (trex_fast/kernels/) must match;
tests and benchmarks compare against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trex_fast.config import LOSS_IMPLS


def resolve_loss_impl(impl: str, device: torch.device | str) -> str:
    """'auto' picks the fused kernel on CUDA and the torch reference elsewhere."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl={impl!r} is not one of {LOSS_IMPLS}")
    if impl == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return impl


def torch_prototype_ce_with_top1(
    z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (mean CE [], per-row top-1 correctness [N] bool). Computed in fp32."""
    z_n = F.normalize(z.float(), dim=1)  # [N, D]
    w_n = F.normalize(weight.float(), dim=1)  # [C, D]
    logits = z_n @ w_n.t() / tau  # [N, C]
    loss = F.cross_entropy(logits, labels)
    correct = logits.argmax(dim=1) == labels
    return loss, correct


def prototype_ce_with_top1(
    z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float, impl: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of cosine logits and the per-row top-1 correctness.

    z: [N, D] projector outputs (any float dtype); weight: [C, D]; labels: [N] int64.
    impl: "torch" (reference), "triton" (fused kernel, no N x C logits in memory) or "auto".
    """
    impl = resolve_loss_impl(impl, z.device)
    if impl == "triton":
        from trex_fast.kernels.prototype_ce import fused_prototype_ce  # triton only when asked

        return fused_prototype_ce(z, weight, labels, tau)
    return torch_prototype_ce_with_top1(z, weight, labels, tau)


def prototype_cross_entropy(
    z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float, impl: str = "torch"
) -> torch.Tensor:
    """Mean cross-entropy of normalize(z) @ normalize(weight).T / tau against labels."""
    return prototype_ce_with_top1(z, weight, labels, tau, impl)[0]
