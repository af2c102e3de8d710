"""Ahead-of-time compile descriptions of the project's Triton kernels (issue 14, item 8).

Every kernel module exposes `aot_kernels() -> list[AotKernel]`: the launch configurations its
launcher picks at the production shapes and dtypes. `tools/aot_check.py` compiles each one for
a named GPU target with triton's compiler and ptxas (no GPU needed) and reports registers,
spills, shared memory, the matrix instructions used and the programs an SM holds at once
(`programs_per_sm`, from the target's limits in `TARGETS`). This module imports neither torch
nor triton, so describing a kernel costs nothing at import time.
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


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of a GPU architecture (CUDA C Programming Guide, "Compute Capabilities"
    table; issue 22, item 8). Shared memory in bytes: per SM, and per block with the opt-in."""

    capability: int  # e.g. 90
    shared_per_sm: int
    shared_per_block: int
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


# H100/H200 (sm_90a): 228 KB per SM, 227 KB per block; A100 (sm_80): 164 KB, 163 KB.
TARGETS = {
    "sm_80": SmLimits(80, 164 * 1024, 163 * 1024),
    "sm_86": SmLimits(86, 100 * 1024, 99 * 1024, threads_per_sm=1536, blocks_per_sm=16),
    "sm_89": SmLimits(89, 100 * 1024, 99 * 1024, threads_per_sm=1536, blocks_per_sm=24),
    "sm_90a": SmLimits(90, 228 * 1024, 227 * 1024),
}
SHARED_RESERVED_PER_BLOCK = 1024  # bytes the CUDA runtime keeps per resident block (sm_80+)
_REGISTER_UNIT = 256  # registers are allocated per warp in units of 256


def programs_per_sm(limits: SmLimits, registers: int, shared: int, num_warps: int) -> int:
    """Programs (thread blocks) of one kernel resident on one SM at once: the least of what
    its shared memory, its registers (registers per thread, allocated per warp) and its
    threads allow. 0 when one program does not fit."""
    threads = 32 * num_warps
    per_warp = -(-registers * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
    by_registers = limits.registers_per_sm // (per_warp * num_warps)
    by_shared = (limits.shared_per_sm // (shared + SHARED_RESERVED_PER_BLOCK)
                 if shared <= limits.shared_per_block else 0)
    return min(by_registers, by_shared, limits.threads_per_sm // threads, limits.blocks_per_sm)
