"""Ahead-of-time compile descriptions of the project's Triton kernels (issue 14, item 8).

Every kernel module exposes `aot_kernels() -> list[AotKernel]`: the launch configurations its
launcher picks at the production shapes and dtypes. `tools/aot_check.py` compiles each one for
a named GPU target with triton's compiler and ptxas (no GPU needed) and reports registers,
spills, shared memory and the matrix instructions used. This module imports neither torch nor
triton, so describing a kernel costs nothing at import time.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AotKernel:
    """One kernel at one launch configuration.

    signature: every non-constexpr argument in order, as a triton type string ("*bf16", "*fp32",
    "*i64", "i32", "fp32"); constexprs: {name: value} for the tl.constexpr arguments (block
    sizes included). divisible_by_16: integer arguments whose production values are multiples
    of 16 (the JIT specialises those, which changes the code; pointers from torch are assumed
    16-byte aligned, as freshly allocated tensors are).
    """

    name: str  # e.g. "prototype_ce_fwd[N=2304,C=1000]"
    fn: object  # the @triton.jit function
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    production: bool = True  # the CI test asserts no register spills for production configs
    has_dot: bool = False  # has a tl.dot (so wgmma is expected on sm_90a for prototype CE)
    divisible_by_16: tuple = ()


TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                   "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8"}


def pointer(dtype) -> str:
    """Triton pointer type of a torch dtype (or its name): torch.bfloat16 -> "*bf16"."""
    name = str(dtype).removeprefix("torch.")
    return "*" + TORCH_TO_TRITON[name]


def for_launch(name: str, fn, pointers: dict, ints: dict, constexprs: dict, floats=(),
               **options) -> AotKernel:
    """AotKernel for a launch of fn as its launcher makes it.

    pointers: {arg: torch dtype} for the tensor arguments; floats: the fp32 scalar arguments;
    ints: {arg: production value} for every other runtime argument. As the JIT specialises
    them, an int equal to 1 becomes a constexpr and a multiple of 16 gets the divisibility
    hint. options: the other AotKernel fields (num_warps, production, has_dot, ...).
    """
    constexprs = dict(constexprs)
    signature, divisible = {}, []
    for arg in fn.arg_names:
        if arg in constexprs:
            continue
        if arg in pointers:
            signature[arg] = pointer(pointers[arg])
        elif arg in floats:
            signature[arg] = "fp32"
        elif ints[arg] == 1:
            constexprs[arg] = 1
        else:
            signature[arg] = "i32"
            if ints[arg] % 16 == 0:
                divisible.append(arg)
    return AotKernel(name=name, fn=fn, signature=signature, constexprs=constexprs,
                     divisible_by_16=tuple(divisible), **options)
