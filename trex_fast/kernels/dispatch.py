"""The prototype cross-entropy's dispatcher (loss_impl): the plain-torch spec
(trex_fast/losses.py) or the fused Triton kernel (trex_fast/kernels/prototype_ce.py, imported
only when chosen). It lives outside both, so that neither imports the other's chooser."""
from __future__ import annotations

import torch

from trex_fast.availability import resolve_loss_impl
from trex_fast.losses import torch_prototype_ce_with_top1


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
