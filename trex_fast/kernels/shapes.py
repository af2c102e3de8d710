"""The fused prototype cross-entropy's production shapes (DESIGN.md "Kernel"), their one home:
the kernel's ahead-of-time configurations (prototype_ce.aot_kernels), tools/bench_kernel.py
(--shapes=production), tools/gpu_check.sh, the tests and docs/KERNELS.md read them here.
Imports nothing, so the benchmark can parse its flags without triton.
"""
from __future__ import annotations

# (N rows, C classes): N = 9 crops x 256 images, the recipe's step; C = ImageNet-1K's classes,
# then the large case, 16384 rows against ImageNet-21K's 21841 classes.
PRODUCTION_SHAPES = ((2304, 1000), (16384, 21841))
PRODUCTION_DIM = 256  # D: the projector's bottleneck, the prototypes' width


def shape_label(n: int, c: int) -> str:
    """How a kernel configuration names its shape, e.g. "N=2304,C=1000"."""
    return f"N={n},C={c}"


def shapes_flag(shapes=PRODUCTION_SHAPES) -> str:
    """The shapes as tools/bench_kernel.py's --shapes value, e.g. "2304x1000,16384x21841"."""
    return ",".join(f"{n}x{c}" for n, c in shapes)
