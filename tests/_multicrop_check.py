"""What the multi-crop kernels are checked with: test images, the bars (issue 13) and the
GPU's TF32 dot emulated in Triton's interpreter (issue 22, item 6). Used by
tests/unit/test_multicrop_kernels.py and tests/unit/test_gpu.py.

On CUDA, `tl.dot(..., input_precision="tf32")` feeds fp32 operands to the tensor cores, which
read 10 of their 23 mantissa bits: the low 13 bits are dropped (truncation toward zero; the
PTX carries no `cvt.rna.tf32`). The interpreter computes such a dot in IEEE fp32, so a kernel
whose result depends on the dropped bits passes on the CPU and is biased on the GPU.
`emulate_hardware_tf32` makes the interpreter truncate the operands of tf32 dots as the
hardware does, and makes the multi-crop kernels ask for tf32 dots off CUDA, as on CUDA.
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines.stage import torch_spec as G

TF32_DROPPED_BITS = 13  # fp32 keeps 23 mantissa bits, tf32 10
# Bars, in de-normalised 0-255 units: max |diff| per sample, mean |diff| (bf16 output: both
# sides round to bf16, 1 ulp at |x| ~ 2.6 is 0.6 of 255), and |mean signed diff| per crop
# group (a bias: every crop lighter or darker; rounding noise averages out).
MAX_255 = 2.0
MEAN_255 = {torch.float32: 0.3, torch.bfloat16: 0.35}
BIAS_255 = 0.02
STD_255 = torch.tensor(G.IMAGENET_STD).view(1, 3, 1, 1) * 255


def smooth_canvas(sizes: list[tuple[int, int]], seed: int = 0, gray: tuple[int, ...] = ()):
    """Smooth random images (JPEG-like content) top-left in a canvas; images in `gray` have
    R = G = B (grayscale sources)."""
    g = torch.Generator().manual_seed(seed)
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    canvas = torch.zeros(len(sizes), hmax, wmax, 3, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        small = torch.rand(1, 3, max(1, h // 6), max(1, w // 6), generator=g)
        image = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0]
        if i in gray:
            image = image[:1].expand(3, -1, -1)
        canvas[i, :h, :w] = (image * 255).round().byte().permute(1, 2, 0)
    return canvas, torch.tensor(sizes)


def diff_255(ours: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """Signed difference of normalised crops [N, 3, S, S] in 0-255 units, on the CPU."""
    return (ours.float().cpu() - spec.float().cpu()) * STD_255


def assert_close_255(ours: torch.Tensor, spec: torch.Tensor, what: str,
                     max_tol: float = MAX_255, mean_tol: float = MEAN_255[torch.float32]):
    """Normalised crops compared in 0-255 units, every sample checked."""
    diff = diff_255(ours, spec).abs()
    per_sample = diff.amax(dim=(1, 2, 3))
    assert per_sample.max() <= max_tol and diff.mean() <= mean_tol, (
        what, per_sample.max().item(), diff.mean().item())


def assert_unbiased_255(ours: torch.Tensor, spec: torch.Tensor, what: str):
    """The crops of one group are neither darker nor lighter than the spec's on average."""
    bias = diff_255(ours, spec).mean().item()
    assert abs(bias) <= BIAS_255, (what, bias)


def truncate_to_tf32(values: np.ndarray) -> np.ndarray:
    """fp32 array -> the same with the low 13 mantissa bits cleared (what the hardware reads)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFFFFFF << TF32_DROPPED_BITS & 0xFFFFFFFF)).view(np.float32)


def emulate_hardware_tf32(monkeypatch) -> None:
    """Until the test ends: interpreted tf32 dots truncate their fp32 operands, and the
    multi-crop kernels launch with tf32 dots on the CPU (pytest's monkeypatch undoes both)."""
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    from pipelines.stage import triton_multicrop as multicrop

    ieee_dot = InterpreterBuilder.create_dot

    def tf32_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = (TensorHandle(truncate_to_tf32(h.data), h.dtype) if h.data.dtype == np.float32
                    else h for h in (a, b))
        return ieee_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", tf32_dot)
    monkeypatch.setattr(multicrop, "_dot_precision", lambda device: "tf32")
