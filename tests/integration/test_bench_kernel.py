"""tools/bench_kernel.py at tiny sizes on CPU, so that the benchmark cannot rot.

One subprocess run (the script sets TRITON_INTERPRET=1 itself) checks the JSON lines of the
eager baselines and the kernel under bf16 autocast; torch.compile is exercised in-process with
a failing stand-in only, because a real inductor compile costs about 30 s on a 2-core CPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from trex_fast.kernels.shapes import PRODUCTION_SHAPES, shapes_flag

ROOT = Path(REPO)
SCRIPT = ROOT / "tools" / "bench_kernel.py"
SPEEDUPS = {"speedup_vs_torch", "speedup_vs_eager_bf16", "speedup_vs_compile",
            "speedup_vs_compile_bf16"}
FIELDS = {"impl", "status", "reason", "fwd_ms", "bwd_ms", "total_ms", "peak_mem_mb",
          "extra_mem_mb", "loss", "n", "c", "d", "dtype", "weight_dtype", "autocast", "device",
          "weight_grad", "iters", "warmup", "device_name", "torch_version",
          "triton_version"} | SPEEDUPS


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_prints_one_json_line_per_measurement():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # --impls in another order than the script's: baselines still run first.
    cmd = [sys.executable, str(SCRIPT), "--device=cpu", "--n=40,17", "--c=9", "--d=37",
           "--impls=triton,eager_bf16,torch", "--iters=2", "--warmup=1", "--weight_grad"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [(r["n"], r["impl"]) for r in records] == [
        (40, "torch"), (40, "eager_bf16"), (40, "triton"),
        (17, "torch"), (17, "eager_bf16"), (17, "triton")]
    for rec in records:
        assert FIELDS <= rec.keys()
        assert rec["status"] == "ok" and rec["reason"] is None
        assert rec["device"] == "cpu" and rec["peak_mem_mb"] is None  # no GPU memory on CPU
        assert (rec["dtype"], rec["weight_dtype"], rec["autocast"]) == (
            "bfloat16", "float32", "bf16")
        assert rec["fwd_ms"] > 0 and rec["bwd_ms"] > 0 and rec["total_ms"] > 0
        assert rec["speedup_vs_compile"] is None and rec["speedup_vs_compile_bf16"] is None
    for torch_rec, eager, fused in (records[:3], records[3:]):
        assert torch_rec["speedup_vs_torch"] == 1.0 and torch_rec["speedup_vs_eager_bf16"] is None
        assert math.isfinite(eager["speedup_vs_torch"])
        assert math.isfinite(fused["speedup_vs_torch"])
        assert math.isfinite(fused["speedup_vs_eager_bf16"])
        # Same inputs, same numerics under autocast: the kernel matches the specification,
        # the bf16 matmul of normalised operands does not (to this bound).
        assert fused["loss"] == pytest.approx(torch_rec["loss"], rel=1e-5)
        assert eager["loss"] != pytest.approx(torch_rec["loss"], rel=1e-5)


def test_each_record_is_printed_before_the_next_measurement(monkeypatch, capsys):
    """Issue 14, item 4: a run cut short (here: interrupted during the second measurement)
    keeps the first record on stdout."""
    bench = load_bench()
    calls = []

    def measure(fn, inputs, iters, warmup):
        calls.append(fn)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a time limit arriving mid-table
        return dict(fwd_ms=1.0, bwd_ms=2.0, total_ms=3.0, peak_mem_mb=None,
                    extra_mem_mb=None, loss=0.5)

    monkeypatch.setattr(bench, "measure", measure)
    args = bench.parse_args(["--device=cpu", "--n=8", "--c=5", "--d=16",
                             "--impls=torch,eager_bf16", "--iters=1", "--warmup=0"])
    with pytest.raises(KeyboardInterrupt):
        bench.run(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["impl"] == "torch"


def test_compile_failure_is_reported_as_skipped(monkeypatch):
    bench = load_bench()

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler here\nsecond line")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    args = bench.parse_args(["--device=cpu", "--n=8", "--c=5", "--d=16", "--dtype=float32",
                             "--impls=torch,compile,compile_bf16", "--iters=1", "--warmup=0"])
    eager, compiled, compiled_bf16 = bench.run(args)
    assert eager["status"] == "ok"
    for rec in (compiled, compiled_bf16):
        assert rec["status"] == "skipped"
        assert rec["reason"] == "RuntimeError: no C++ compiler here"
        assert rec["speedup_vs_torch"] is None


def test_a_failed_measurement_fails_the_process(monkeypatch, capsys):
    """Issue 22, item 4: an error record (here out of memory at the second shape) still ends
    as a JSON line, and the process exits non-zero, so gpu_check.sh records a failed stage."""
    bench = load_bench()

    def measure(fn, inputs, iters, warmup):
        if inputs[0].shape[0] == 17:
            raise RuntimeError("CUDA out of memory")
        return dict(fwd_ms=1.0, bwd_ms=2.0, total_ms=3.0, peak_mem_mb=None,
                    extra_mem_mb=None, loss=0.5)

    monkeypatch.setattr(bench, "measure", measure)
    for name in ("TRITON_INTERPRET", "TORCHINDUCTOR_COMPILE_THREADS"):  # main sets them
        monkeypatch.setenv(name, "1")
    argv = ["--device=cpu", "--n=8,17", "--c=5", "--d=16", "--impls=torch", "--iters=1"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert str(exit_info.value) == "bench_kernel: 1 record(s) not ok: torch at 17x5: error"
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["status"] for r in records] == ["ok", "error"]
    bench.main(argv[:1] + ["--n=8"] + argv[2:])  # every record ok: a normal return


def test_help_documents_every_flag(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--n", "--c", "--d", "--dtype", "--weight_dtype", "--autocast", "--device",
                 "--impls", "--shapes", "--iters", "--warmup", "--weight_grad", "--block_n",
                 "--block_c", "--num_warps", "--grad_num_warps", "--class_splits",
                 "--weight_grad_splits"):
        assert flag in text
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls=torch,jax"])
    assert bench.parse_args(["--n=1,2", "--c=3,4"]).shapes == [(1, 3), (1, 4), (2, 3), (2, 4)]
    assert bench.parse_args([f"--shapes={shapes_flag()}"]).shapes == list(PRODUCTION_SHAPES)
    assert bench.parse_args(["--shapes=production"]).shapes == list(PRODUCTION_SHAPES)
