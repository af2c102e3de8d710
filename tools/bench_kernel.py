"""Benchmark the fused prototype cross-entropy (issues 6, 14) against eager and compiled torch.

For every (N, C) shape and implementation it measures, after --warmup untimed iterations, the
median over --iters iterations of the forward (loss and top-1), the backward and their total,
and the peak memory of one forward + backward. The forward runs under --autocast (default
bf16, as in the training step; the backward outside it, as there), on z in --dtype against W
in --weight_dtype (default fp32, as the memory's prototypes):

    torch         trex_fast.losses.torch_prototype_ce_with_top1, the specification, eager:
                  fp32 logits from operands rounded as the kernel rounds them (what
                  loss_impl=torch trains with)
    eager_bf16    the same loss written the plain way: normalise, matmul in the autocast dtype
                  (bf16 tensor cores), fp32 cross-entropy; the fastest eager baseline (what
                  loss_impl=torch ran before issue 14, item 11)
    compile       torch.compile of the specification
    compile_bf16  torch.compile of eager_bf16
    triton        trex_fast.kernels.prototype_ce.fused_prototype_ce
(a compile that fails is reported as skipped, with the reason). Each record has
speedup_vs_<baseline> = baseline total time / this total time for every baseline above
measured at that shape, itself included (null otherwise); baselines run first, so the triton
record has them all.

Timing: CUDA events on GPU, time.perf_counter on CPU. Memory (GPU only, null on CPU):
peak_mem_mb = torch.cuda.max_memory_allocated during one forward + backward; extra_mem_mb =
that peak minus what was allocated before it (inputs excluded; the gradients of z and W and
every temporary included). On CPU the script sets TRITON_INTERPRET=1 itself, so only tiny
sizes are practical there, e.g.

    python tools/bench_kernel.py --device=cpu --n=64 --c=50 --impls=torch,eager_bf16,triton

Progress goes to stderr; each JSON record goes to stdout (flushed) as soon as it is measured,
so a run cut short by a time limit keeps the lines it has printed. The process exits 1 when
any record is not "ok" (an error, or a compile that failed): a benchmark that did not measure
what it was asked is a failed stage of tools/gpu_check.sh (issue 22).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

from trex_fast.kernels.shapes import PRODUCTION_DIM, PRODUCTION_SHAPES, shapes_flag  # noqa: E402
from trex_fast.losses import torch_prototype_ce_with_top1  # noqa: E402

IMPLS = ("torch", "eager_bf16", "compile", "compile_bf16", "triton")  # baselines first
BASELINES = IMPLS[:-1]
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
TAU = 0.1  # RECIPE.md: logits are cosine similarities / 0.1
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _shape_list(text: str) -> list[tuple[int, int]]:
    if text == "production":
        return list(PRODUCTION_SHAPES)
    return [tuple(int(x) for x in pair.split("x")) for pair in text.split(",") if pair]


# the default --n x --c grid: the production shapes' rows and classes, and 9216 rows between
# them (9 crops x a global batch of 1024)
GRID_ROWS = sorted({n for n, _ in PRODUCTION_SHAPES} | {9 * 1024})
GRID_CLASSES = sorted({c for _, c in PRODUCTION_SHAPES})


def _csv(values) -> str:
    return ",".join(map(str, values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--n", type=_int_list, default=GRID_ROWS,
        help=f"rows (crops per step), comma-separated (default {_csv(GRID_ROWS)})")
    add("--c", type=_int_list, default=GRID_CLASSES,
        help=f"classes, comma-separated (default {_csv(GRID_CLASSES)})")
    add("--shapes", type=_shape_list, default=None,
        help="NxC pairs instead of the --n x --c grid, e.g. 64x50,128x50, or 'production': "
             f"{shapes_flag()} (trex_fast/kernels/shapes.py)")
    add("--d", type=int, default=PRODUCTION_DIM,
        help=f"feature dim of the projector output (default {PRODUCTION_DIM})")
    add("--dtype", choices=sorted(DTYPES), default="bfloat16",
        help="dtype of z, the projector output (default bfloat16)")
    add("--weight_dtype", choices=sorted(DTYPES), default="float32",
        help="dtype of W (default float32: the memory's prototypes, the classifier's weight)")
    add("--autocast", choices=("bf16", "fp16", "none"), default="bf16",
        help="autocast of the forward, as the training step's precision (default bf16)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: cuda when available); cpu runs Triton interpreted")
    add("--impls", type=lambda s: s.split(","), default=list(IMPLS),
        help=f"comma-separated subset of {','.join(IMPLS)} (default all)")
    add("--iters", type=int, default=20, help="timed iterations, median reported (default 20)")
    add("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    add("--weight_grad", action="store_true",
        help="W requires grad (plain preset's learned classifier); default: prototypes, no grad")
    add("--block_n", type=int, default=None, help="triton: rows per tile (default: heuristic)")
    add("--block_c", type=int, default=None, help="triton: classes per tile (default: heuristic)")
    add("--num_warps", type=int, default=None, help="triton: warps per forward program")
    add("--grad_num_warps", type=int, default=None,
        help="triton: warps per program of the gradient kernels")
    add("--class_splits", type=int, default=None,
        help="triton: class chunks of the forward and dL/dz (default: fill the GPU)")
    add("--weight_grad_splits", type=int, default=None,
        help="triton: row-block groups of the dL/dW reduction (default: fill the GPU)")
    args = parser.parse_args(argv)
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        parser.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    args.impls = [name for name in IMPLS if name in args.impls]  # baselines before triton
    if args.shapes is None:
        args.shapes = [(n, c) for n in args.n for c in args.c]
    return args


def make_inputs(n: int, c: int, d: int, dtype: torch.dtype, weight_dtype: torch.dtype,
                device: torch.device, weight_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [n, d] (requires grad), W [c, d] with every 20th class absent (zero), labels [n]."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(c, d, generator=gen)
    if not weight_grad:
        weight[::20] = 0.0  # absent classes of the memory bank
    weight = weight.to(device, weight_dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, c, (n,), generator=gen).to(device)
    return z, weight, labels


def autocast_matmul_ce_with_top1(z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine CE the plain eager way: fp32 normalisation, the matmul in the caller's autocast
    dtype (bf16 tensor cores in the training step), the cross-entropy in fp32."""
    logits = F.normalize(z.float(), dim=1) @ F.normalize(weight.float(), dim=1).t() / tau
    loss = F.cross_entropy(logits.float(), labels)  # [N, C] bf16 logits -> fp32 loss
    return loss, logits.argmax(dim=1) == labels


def build_impls(args: argparse.Namespace) -> dict[str, LossFn]:
    """Name -> loss function, each run under --autocast; triton is imported only if asked."""
    fns: dict[str, LossFn] = {}
    for name in args.impls:
        if name == "torch":
            fn = torch_prototype_ce_with_top1
        elif name == "eager_bf16":
            fn = autocast_matmul_ce_with_top1
        elif name == "compile":
            fn = torch.compile(torch_prototype_ce_with_top1, dynamic=False)
        elif name == "compile_bf16":
            fn = torch.compile(autocast_matmul_ce_with_top1, dynamic=False)
        else:
            fn = _triton_fn(args)
        fns[name] = _under_autocast(fn, args)
    return fns


def _under_autocast(fn: LossFn, args: argparse.Namespace) -> LossFn:
    if args.autocast == "none":
        return fn
    dtype = DTYPES[args.autocast]
    device_type = torch.device(args.device).type

    def run_autocast(z, weight, labels, tau):
        with torch.autocast(device_type, dtype=dtype):
            return fn(z, weight, labels, tau)

    return run_autocast


def _triton_fn(args: argparse.Namespace) -> LossFn:
    from trex_fast.kernels import prototype_ce

    def fn(z, weight, labels, tau):
        defaults = prototype_ce.default_block_config(z, weight)  # in the autocast state
        blocks = dataclasses.replace(
            defaults, block_n=args.block_n or defaults.block_n,
            block_c=args.block_c or defaults.block_c,
            num_warps=args.num_warps or defaults.num_warps,
            grad_num_warps=args.grad_num_warps or defaults.grad_num_warps,
            class_splits=args.class_splits, weight_grad_splits=args.weight_grad_splits)
        return prototype_ce.fused_prototype_ce(z, weight, labels, tau, blocks=blocks)

    return fn


def _one_step(fn: LossFn, z, weight, labels) -> tuple[float, float, torch.Tensor]:
    """One forward + backward; returns (forward ms, backward ms, loss). Syncs once at the end."""
    z.grad = weight.grad = None  # no gradient-accumulation kernel inside the timed region
    if z.device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        loss, _ = fn(z, weight, labels, TAU)
        events[1].record()
        loss.backward()
        events[2].record()
        events[2].synchronize()
        return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]), loss
    start = time.perf_counter()
    loss, _ = fn(z, weight, labels, TAU)
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    return (mid - start) * 1e3, (end - mid) * 1e3, loss


def _peak_memory_mb(fn: LossFn, z, weight, labels) -> tuple[float | None, float | None]:
    """(peak, peak minus the allocation before the step) in MiB over one step; None on CPU."""
    if z.device.type != "cuda":
        return None, None
    z.grad = weight.grad = None
    torch.cuda.synchronize(z.device)
    torch.cuda.reset_peak_memory_stats(z.device)
    before = torch.cuda.memory_allocated(z.device)
    loss, _ = fn(z, weight, labels, TAU)
    loss.backward()
    torch.cuda.synchronize(z.device)
    peak = torch.cuda.max_memory_allocated(z.device)
    return peak / 2**20, (peak - before) / 2**20


def measure(fn: LossFn, inputs: tuple, iters: int, warmup: int) -> dict:
    """Median timings, peak memory and the loss value of one implementation at one shape."""
    for _ in range(warmup):
        _one_step(fn, *inputs)
    steps = [_one_step(fn, *inputs) for _ in range(iters)]
    peak, extra = _peak_memory_mb(fn, *inputs)
    return dict(
        fwd_ms=statistics.median(s[0] for s in steps),
        bwd_ms=statistics.median(s[1] for s in steps),
        total_ms=statistics.median(s[0] + s[1] for s in steps),
        peak_mem_mb=peak, extra_mem_mb=extra, loss=float(steps[-1][2].detach()),
    )


def _environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return dict(device_name=name, torch_version=torch.__version__,
                triton_version=triton_version)


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every (shape, impl); print each record (JSON, stdout) as soon as it exists."""
    device = torch.device(args.device)
    dtype, weight_dtype = DTYPES[args.dtype], DTYPES[args.weight_dtype]
    fns = build_impls(args)
    env = _environment(device)
    records = []
    for n, c in args.shapes:
        inputs = make_inputs(n, c, args.d, dtype, weight_dtype, device, args.weight_grad)
        shape_records: list[dict] = []
        for name, fn in fns.items():
            rec = _measure_record(name, fn, inputs, args)
            _add_speedups(rec, shape_records)
            rec.update(n=n, c=c, d=args.d, dtype=_name(dtype), weight_dtype=_name(weight_dtype),
                       autocast=args.autocast, device=device.type,
                       weight_grad=args.weight_grad, iters=args.iters, warmup=args.warmup,
                       **env)
            print(_progress_line(rec), file=sys.stderr, flush=True)
            print(json.dumps(rec), flush=True)
            shape_records.append(rec)
        records += shape_records
        del inputs
    return records


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _measure_record(name: str, fn: LossFn, inputs: tuple, args: argparse.Namespace) -> dict:
    """Measure, turning a failure into a record: compile failures are 'skipped', others 'error'
    (e.g. out of memory at the largest shapes), so one failure does not end the table."""
    try:
        return dict(impl=name, status="ok", reason=None,
                    **measure(fn, inputs, args.iters, args.warmup))
    except Exception as exc:  # reported in the JSON line, not swallowed
        status = "skipped" if name.startswith("compile") else "error"
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        return dict(impl=name, status=status, reason=f"{type(exc).__name__}: {first_line}")
    finally:
        if inputs[0].device.type == "cuda":
            torch.cuda.empty_cache()  # eager's N x C temporaries do not crowd the next impl


def _add_speedups(rec: dict, earlier: list[dict]) -> None:
    """speedup_vs_<baseline> = baseline total time / rec's, for every baseline measured ok at
    this shape before rec, or rec itself (1.0); null otherwise."""
    done = {r["impl"]: r["total_ms"] for r in [*earlier, rec] if r["status"] == "ok"}
    for baseline in BASELINES:
        ok = baseline in done and rec["status"] == "ok"
        rec[f"speedup_vs_{baseline}"] = done[baseline] / rec["total_ms"] if ok else None


def _progress_line(rec: dict) -> str:
    where = f"N={rec['n']:>6} C={rec['c']:>6} D={rec['d']} {rec['dtype']:<8} {rec['impl']:<8}"
    if rec["status"] != "ok":
        return f"{where} {rec['status']}: {rec['reason']}"
    mem = "" if rec["peak_mem_mb"] is None else f"  peak {rec['peak_mem_mb']:.1f} MiB"
    return (f"{where} fwd {rec['fwd_ms']:9.3f} ms  bwd {rec['bwd_ms']:9.3f} ms  "
            f"total {rec['total_ms']:9.3f} ms{mem}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        # Must precede the first import of the kernel module (triton.jit reads it there).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # Inductor compiles in-process. Observed on the 2-core CPU machine: with its compile
        # worker pool alive, steps of the compiled reference took ~110 ms instead of ~0.15 ms.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    failed = [f"{r['impl']} at {r['n']}x{r['c']}: {r['status']}" for r in run(args)
              if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"bench_kernel: {len(failed)} record(s) not ok: {', '.join(failed)}")


if __name__ == "__main__":
    main()
