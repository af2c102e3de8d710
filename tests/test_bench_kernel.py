"""tools/bench_kernel.py at tiny sizes on CPU, so that the benchmark cannot rot.

One subprocess run (torch and triton, the script sets TRITON_INTERPRET=1 itself) checks the
JSON lines; torch.compile is exercised in-process with a failing stand-in only, because a real
inductor compile costs about 30 s on a 2-core CPU.
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

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench_kernel.py"
FIELDS = {"impl", "status", "reason", "fwd_ms", "bwd_ms", "total_ms", "peak_mem_mb",
          "extra_mem_mb", "loss", "speedup_vs_torch", "n", "c", "d", "dtype", "device",
          "weight_grad", "iters", "warmup", "device_name", "torch_version", "triton_version"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_prints_one_json_line_per_measurement():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--device=cpu", "--n=40,17", "--c=9", "--d=37",
           "--dtype=float32", "--impls=torch,triton", "--iters=2", "--warmup=1", "--weight_grad"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()[-4:]  # 2 shapes x 2 impls
    records = [json.loads(line) for line in lines]
    assert [(r["n"], r["impl"]) for r in records] == [
        (40, "torch"), (40, "triton"), (17, "torch"), (17, "triton")]
    for rec in records:
        assert FIELDS <= rec.keys()
        assert rec["status"] == "ok" and rec["reason"] is None
        assert rec["device"] == "cpu" and rec["peak_mem_mb"] is None  # no GPU memory on CPU
        assert rec["fwd_ms"] > 0 and rec["bwd_ms"] > 0 and rec["total_ms"] > 0
        assert math.isfinite(rec["speedup_vs_torch"])
    for eager, fused in (records[:2], records[2:]):  # same inputs: the losses must agree
        assert fused["loss"] == pytest.approx(eager["loss"], rel=1e-5)


def test_compile_failure_is_reported_as_skipped(monkeypatch):
    bench = load_bench()

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler here\nsecond line")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    args = bench.parse_args(["--device=cpu", "--n=8", "--c=5", "--d=16", "--dtype=float32",
                             "--impls=torch,compile", "--iters=1", "--warmup=0"])
    eager, compiled = bench.run(args)
    assert eager["status"] == "ok"
    assert compiled["status"] == "skipped"
    assert compiled["reason"] == "RuntimeError: no C++ compiler here"
    assert compiled["speedup_vs_torch"] is None


def test_help_documents_every_flag(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--n", "--c", "--d", "--dtype", "--device", "--impls", "--iters", "--warmup",
                 "--weight_grad", "--block_n", "--block_c", "--num_warps"):
        assert flag in text
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls=torch,jax"])
