"""Measure how far the Triton multi-crop stage is from its torch spec, per crop group (issue 22).

On the CPU, in Triton's interpreter (set here): both impls of `GpuMultiCrop` make the crops of
one batch from the same draws, and for each group the script prints the mean signed difference
triton - spec (a bias: negative = darker), the mean |difference| and the largest, in 0-255
units. --dots=tf32 emulates the GPU's tf32 dots (operands truncated to 10 mantissa bits, as
tests/_multicrop_check.py does for the tests); --dots=ieee computes them in fp32.

    python tools/multicrop_bias.py --images=photo --dots=tf32
    python tools/multicrop_bias.py --images=photo-production --dots=ieee   # minutes

Images: "smooth" the stage test's canvases, "photo" scikit-learn's china.jpg in six small
canvases with small crops (the photo test), "photo-production" china.jpg in six canvases of
96x128 to 500x375 with t-ReX's crops (1 x 224 + 8 x 96).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.spec import multicrop_spec  # noqa: E402
from pipelines.stage.dispatch import GpuMultiCrop  # noqa: E402
from tests import test_multicrop_kernels as T  # noqa: E402
from tests._multicrop_check import diff_255, emulate_hardware_tf32, smooth_canvas  # noqa: E402
from trex_fast.config import make_config  # noqa: E402

PRODUCTION_SHAPES = [(427, 640), (500, 375), (333, 500), (256, 256), (180, 240), (96, 128)]


def _inputs(images: str):
    """-> (canvas, sizes, crop spec) of the named input."""
    if images == "smooth":
        canvas, sizes = smooth_canvas([(90, 120), (20, 25), (3, 2), (120, 120), (50, 77)],
                                      seed=1, gray=(3,))
        return canvas, sizes, T.SPEC
    if images == "photo":
        return *T._photo_canvas(T.PHOTO_SHAPES), T.PHOTO_SPEC
    canvas, sizes = T._photo_canvas(PRODUCTION_SHAPES)
    return canvas, sizes, multicrop_spec(make_config("trex", batch_size=len(sizes)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", choices=("smooth", "photo", "photo-production"),
                        default="photo")
    parser.add_argument("--dots", choices=("ieee", "tf32"), default="tf32")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    patch = pytest.MonkeyPatch()
    if args.dots == "tf32":
        emulate_hardware_tf32(patch)
    canvas, sizes, spec = _inputs(args.images)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    labels = torch.zeros(len(sizes))
    out = {impl: GpuMultiCrop(spec, torch.device("cpu"), dtype, True, seed=0,
                              impl=impl)(canvas, sizes, labels, epoch=0, step=0)
           for impl in ("torch", "triton")}
    for name in ("global_crops", "local_crops"):
        diff = diff_255(getattr(out["triton"], name), getattr(out["torch"], name))
        print(f"{args.images} {args.dots} {args.dtype} {name}: mean signed "
              f"{diff.mean().item():+.4f}, mean abs {diff.abs().mean().item():.4f}, "
              f"max {diff.abs().max().item():.3f} (of 255)")
    patch.undo()


if __name__ == "__main__":
    main()
