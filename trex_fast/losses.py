"""Prototype-similarity cross-entropy: the plain-torch reference (RECIPE.md, "Classifier").

logits = normalize(z) @ normalize(W).T / tau, then mean cross-entropy over the rows. W is
either the class prototypes of the memory bank (no gradient) or the weight of the plain
preset's learned cosine classifier (gets a gradient). A zero row of W (a class absent from
the memory) stays zero under the normalisation, so its logit is exactly 0.

This file is the specification that the fused Triton kernel (trex_fast/kernels/) must match;
tests and benchmarks compare against it, and loss_impl="torch" trains with it (the choice is
made in trex_fast/kernels/dispatch.py). Both compute
with the same numerics (issue 14, item 11), so the two impls train alike under autocast too:

- the dot products take z and W rounded to `dot_operand_dtype(z, W)`: their promoted dtype,
  or the autocast dtype where that is fp32 under autocast (bf16 z against fp32 prototypes in
  the bf16 training step gives bf16 operands); products and sums are fp32, autocast is
  disabled locally (a product of two 16-bit operands is exact in fp32);
- the norms come from the unrounded inputs in fp32: logits = <z~, w~> / (max(||z||, eps) *
  max(||w||, eps) * tau), and the cross-entropy and argmax run on these fp32 logits.
Without autocast and with fp32 inputs this is plain fp32. It differs from normalising first
and letting autocast run the matmul in bf16, which rounds the normalised operands instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default eps: x / max(||x||, eps)


def dot_operand_dtype(z: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Operand dtype of the logits' dot products: the promoted input dtype (bf16 + fp16 ->
    fp32), except that an fp32 result becomes the autocast dtype under autocast, as
    torch.matmul's operands would."""
    dtype = torch.promote_types(z.dtype, weight.dtype)
    device_type = z.device.type
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        if autocast_dtype in (torch.bfloat16, torch.float16):
            dtype = autocast_dtype
    return dtype


def torch_prototype_ce_with_top1(
    z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (mean CE [] fp32, per-row top-1 correctness [N] bool).

    Logits in fp32 from operands rounded to `dot_operand_dtype` (the module docstring),
    autocast disabled here whatever the caller's context. The rounding is z.to(dtype), so the
    gradient passes through it unchanged (straight through), as in the kernel's backward.
    """
    dot_dtype = dot_operand_dtype(z, weight)
    with torch.autocast(z.device.type, enabled=False):
        # F.normalize's denominators, from the unrounded inputs: max(||x||, eps).
        z_scale = 1.0 / (z.float().norm(dim=1, keepdim=True).clamp_min(NORM_EPS) * tau)  # [N, 1]
        w_scale = 1.0 / weight.float().norm(dim=1, keepdim=True).clamp_min(NORM_EPS)  # [C, 1]
        # Scaled after the matmul, as the kernel does: its operands then stay exactly
        # 16-bit values, whose products TF32 (if enabled for fp32 matmuls) keeps exact too.
        raw = z.to(dot_dtype).float() @ weight.to(dot_dtype).float().t()  # [N, C] fp32
        logits = raw * z_scale * w_scale.t()  # [N, C]
        loss = F.cross_entropy(logits, labels)
        correct = logits.argmax(dim=1) == labels
    return loss, correct
