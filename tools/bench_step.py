"""Throughput of the training step alone, on synthetic MultiCropBatches already on the device.

    python tools/bench_step.py --arch=resnet50 --batch_size=256 --device=cuda   # one config
    python tools/bench_step.py --sweep --batch_size=64                          # precision x
                                          channels_last x compile x loss_impl, one line each

t-ReX by default (1 x 224 + 8 x 96, EMA forward and enqueue included). Timing uses CUDA events
after a warm-up (host timers on CPU, where work is synchronous). Reports samples/s, the time per
phase of the step, peak memory, FLOPs per sample (counted by torch's FlopCounterMode over one
eager step, before anything is compiled) and model FLOP utilisation against a matmul rate
measured in the same process. Each configuration ends as one JSON line on stdout; the process
exits 1 when any of them failed (its line then has an "error").

--compile=True compiles the network after the FLOP count: with a dispatch mode such as
FlopCounterMode active, Dynamo skips the frame, and torch 2.11 marks that code skipped for good
(issue 22), so a compiled first step under the counter would time eager code. The record
counts the graphs Dynamo compiled ("compiled_graphs"); a compile run that compiled none is an
error. --compile_backend=eager (tests, the dry run) traces with Dynamo without inductor's
minutes of code generation.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys

import torch
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trex_fast.availability import resolve_device, resolve_precision  # noqa: E402
from trex_fast.build import build_state  # noqa: E402
from trex_fast.cli import run_cli  # noqa: E402
from trex_fast.config import make_config  # noqa: E402
from trex_fast.distributed import DistInfo  # noqa: E402
from trex_fast.measure.bottleneck import synthetic_batch  # noqa: E402
from trex_fast.measure.profiling import PhaseTimer, timed  # noqa: E402
from trex_fast.plan import COMPUTE_DTYPES, make_plan  # noqa: E402
from trex_fast.step import train_step  # noqa: E402

SINGLE = DistInfo(0, 1, 0, 1)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate on this device (the denominator of the FLOP utilisation)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    bm = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    a @ bm  # warm-up
    seconds = timed(device, lambda: [a @ bm for _ in range(reps)])
    return 2 * n**3 * reps / seconds / 1e12


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (any backend)."""
    return dynamo_counters["stats"]["unique_graphs"]


def bench_config(cfg, num_classes: int, steps: int, warmup: int, peak_tflops: float,
                 compile_backend: str = "inductor") -> dict:
    plan = make_plan(cfg, SINGLE, num_classes, steps_per_epoch=1000)
    state = build_state(dataclasses.replace(cfg, compile=False), plan)  # compiled below
    device = plan.torch_device
    batch = synthetic_batch(cfg, num_classes, device, state.plan.dtype)
    with FlopCounterMode(display=False) as counter:  # one eager step, EMA forward included
        train_step(state, batch)
    flops_per_sample = counter.get_total_flops() / cfg.batch_size
    graphs_before = compiled_graphs()
    if cfg.compile:  # as build_state does, after the counter: no dispatch mode is active
        state.online_ddp = torch.compile(state.online_ddp, backend=compile_backend)
    for _ in range(warmup):
        train_step(state, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = PhaseTimer(device)
    seconds = timed(device, lambda: [train_step(state, batch, timer) for _ in range(steps)])
    phases = timer.read()
    graphs = compiled_graphs() - graphs_before
    if cfg.compile and graphs == 0:
        raise RuntimeError(f"--compile=True compiled no graph (backend {compile_backend}): "
                           "the timed steps ran eager")
    samples_per_s = steps * cfg.batch_size / seconds
    achieved = flops_per_sample * samples_per_s / 1e12
    return {
        "bench": "step", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": cfg.arch, "batch_size": cfg.batch_size, "global": f"{cfg.global_crops}x"
        f"{cfg.global_size}", "local": f"{cfg.local_crops}x{cfg.local_size}",
        "precision": state.precision, "channels_last": cfg.channels_last, "compile": cfg.compile,
        "compiled_graphs": graphs, "loss_impl": state.loss_impl, "steps": steps,
        "samples_per_s": round(samples_per_s, 2),
        "step_ms": round(1000 * seconds / steps, 3),
        "phase_ms": {k: round(v / steps, 3) for k, v in phases.items()},
        "peak_mem_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                         if device.type == "cuda" else None),
        "gflop_per_sample": round(flops_per_sample / 1e9, 2),
        "achieved_tflops": round(achieved, 3), "matmul_tflops": round(peak_tflops, 2),
        "mfu": round(achieved / peak_tflops, 4),
    }


def main(preset: str = "trex", arch: str = "resnet50", batch_size: int = 64,
         global_size: int = 224, local_size: int = 96, local_crops: int = 8, steps: int = 20,
         warmup: int = 5, device: str = "auto", precision: str = "auto",
         channels_last: bool = True, compile: bool = False, loss_impl: str = "auto",
         sweep: bool = False, num_classes: int = 1000,
         compile_backend: str = "inductor") -> None:
    """Benchmark train_step on synthetic data.

    Args:
        preset: recipe preset (trex, trex_star, plain, demo).
        arch: backbone (resnet18/34/50/101).
        batch_size: images per step.
        global_size: global crop side, pixels.
        local_size: local crop side, pixels.
        local_crops: local crops per image.
        steps: timed steps (after the warm-up).
        warmup: untimed steps first (compilation, cuDNN autotuning, allocator).
        device: auto, cpu, cuda or cuda:N.
        precision: auto, bf16, fp16 or fp32 (ignored by --sweep, which tries bf16 and fp32).
        channels_last: channels-last model and crops (--sweep tries both).
        compile: torch.compile the network (--sweep tries both).
        loss_impl: auto, torch or triton (--sweep tries torch and triton).
        sweep: run every combination instead of one configuration.
        num_classes: classes of the prototype head.
        compile_backend: torch.compile backend (inductor; eager traces with Dynamo only, for
            tests and the dry run).
    """
    base = dict(arch=arch, batch_size=batch_size, global_size=global_size, local_size=local_size,
                local_crops=local_crops, device=device, warmup_epochs=0,
                memory_size=max(8192, batch_size) if preset != "plain" else 0)
    variants = [dict(precision=precision, channels_last=channels_last, compile=compile,
                     loss_impl=loss_impl)]
    if sweep:
        variants = [dict(precision=p, channels_last=c, compile=k, loss_impl=li) for p, c, k, li
                    in itertools.product(("bf16", "fp32"), (True, False), (False, True),
                                         ("torch", "triton"))]
    peak: dict[str, float] = {}  # matmul TFLOP/s per compute dtype, measured once each
    failed = []
    for variant in variants:
        cfg = make_config(preset, **base, **variant)
        try:
            dev = resolve_device(cfg.device)
            dtype_name = resolve_precision(cfg.precision, dev)
            if dtype_name not in peak:
                peak[dtype_name] = matmul_tflops(dev, COMPUTE_DTYPES[dtype_name])
            result = bench_config(cfg, num_classes, steps, warmup, peak[dtype_name],
                                  compile_backend)
        except Exception as e:  # one failing variant (e.g. compile) must not hide the others
            result = {"bench": "step", **variant, "error": f"{type(e).__name__}: {e}"[:300]}
            failed.append(result["error"])
        print(json.dumps(result), flush=True)
    if failed:  # a failed benchmark is a failed stage of gpu_check.sh (issue 22)
        raise SystemExit(f"bench_step: {len(failed)} of {len(variants)} configuration(s) "
                         f"failed, first: {failed[0]}")


if __name__ == "__main__":
    run_cli(main)
