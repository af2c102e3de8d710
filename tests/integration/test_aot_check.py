"""tools/aot_check.py: every Triton kernel compiled ahead of time, no GPU needed (issue 14, item 8).

Runs the tool as a subprocess without TRITON_INTERPRET (under it triton.jit gives interpreter
stand-ins that cannot be compiled). Compiling for both targets takes about a minute on a
2-core CPU the first time; triton's cache makes later runs a few seconds each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.stage.aot import TARGETS, programs_per_sm
from tests.helpers import REPO
from trex_fast.kernels.shapes import PRODUCTION_SHAPES, shape_label

triton = pytest.importorskip("triton")

ROOT = Path(REPO)
SCRIPT = ROOT / "tools" / "aot_check.py"
FIELDS = {"kernel", "file", "target", "registers", "spill_bytes", "shared_bytes", "mma",
          "production", "has_dot", "num_warps", "num_stages", "programs_per_sm", "triton",
          "ptxas"}
MATRIX_KERNELS = ("prototype_ce_fwd", "prototype_ce_grad_z", "prototype_ce_grad_w")
SHAPES = tuple(shape_label(n, c) for n, c in PRODUCTION_SHAPES)


def run_aot_check(*args: str, pythonpath: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc, records


@pytest.fixture(scope="module", params=["sm_90a", "sm_80"])
def compiled(request):
    proc, records = run_aot_check(f"--target={request.param}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return request.param, records


def test_every_kernel_compiles_and_production_configs_do_not_spill(compiled):
    target, records = compiled
    names = {r["kernel"] for r in records}
    for kernel in MATRIX_KERNELS:
        for shape in SHAPES:
            assert f"{kernel}[{shape}]" in names
            assert f"{kernel}[fp32,{shape}]" in names
    for rec in records:
        assert FIELDS <= rec.keys(), rec
        assert "error" not in rec, rec
        assert rec["target"] == target and (ROOT / rec["file"]).is_file()
        assert rec["registers"] > 0 and rec["mma"] in ("wgmma", "mma.sync", "none")
        if rec["production"] or rec["kernel"].startswith("prototype_ce"):
            assert rec["spill_bytes"] == 0 and rec["spill_load_bytes"] == 0, rec


def test_prototype_ce_matrix_products_use_the_targets_tensor_core_instructions(compiled):
    """sm_90a: wgmma (warpgroup MMA) for every production prototype-CE kernel with a tl.dot;
    sm_80: mma.sync. The fp32 variant's exact fp32 dots (no TF32) use no tensor cores."""
    target, records = compiled
    matrix = [r for r in records if r["kernel"].startswith("prototype_ce") and r["has_dot"]]
    assert len(matrix) == 2 * len(MATRIX_KERNELS) * len(SHAPES)
    expected = "wgmma" if target == "sm_90a" else "mma.sync"
    for rec in matrix:
        assert rec["mma"] == (expected if rec["production"] else "none"), rec
    assert sum(r["production"] for r in matrix) == len(MATRIX_KERNELS) * len(SHAPES)


def test_launch_plans_assume_the_resident_programs_the_compiled_kernels_have(compiled):
    """Item 8 of issue 22: plan_launch sizes its splits from BlockConfig.programs_per_sm
    (forward, and dL/dz on the same grid) and grad_programs_per_sm (dL/dW). Those must be what
    the compiled kernels allow on this target: at most, on sm_80 and sm_90a; exactly, for the
    production (bf16) kernels on sm_90a, the H100 the plan is tuned for."""
    import torch

    from trex_fast.kernels.prototype_ce import _block_config

    target, records = compiled
    for rec in records:
        name = rec["kernel"]
        if not (rec["has_dot"] and name.startswith("prototype_ce")):
            continue
        assert rec["triton"] == triton.__version__ and rec["ptxas"]
        blocks = _block_config(torch.bfloat16 if rec["production"] else torch.float32, 256,
                               "cuda")
        assumed = (blocks.programs_per_sm if name.startswith("prototype_ce_fwd")
                   else blocks.grad_programs_per_sm)
        assert 1 <= assumed <= rec["programs_per_sm"], rec
        if rec["production"] and target == "sm_90a":
            assert assumed == rec["programs_per_sm"], rec


def test_programs_per_sm_from_registers_shared_memory_and_warps():
    """The occupancy arithmetic on the H100's and A100's limits: the forward's 119 registers x
    128 threads and 96 KB fit 2 per SM; a gradient kernel's 197 registers x 256 threads fit 1
    (registers, not shared memory); 32 registers x 128 threads without shared memory stop at
    the 2048-thread limit, 16; 128 KB fits 1 on both; 200 KB none on an A100 (over its
    163 KB per block)."""
    h100, a100 = TARGETS["sm_90a"], TARGETS["sm_80"]
    assert programs_per_sm(h100, 119, 98304, 4) == 2
    assert programs_per_sm(h100, 197, 98560, 8) == 1
    assert programs_per_sm(h100, 32, 0, 4) == 16
    assert programs_per_sm(h100, 119, 131072, 4) == programs_per_sm(a100, 119, 131072, 4) == 1
    assert programs_per_sm(a100, 128, 66048, 4) == 2
    assert programs_per_sm(a100, 64, 200 * 1024, 4) == 0
    assert programs_per_sm(h100, 255, 0, 8) == 1  # 255 -> 256 per thread: 65536 / (256 x 256)


BROKEN_KERNELS = '''
import triton
import triton.language as tl

from pipelines.stage.aot import AotKernel


@triton.jit
def doubled(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    ok = offsets < n
    tl.store(x_ptr + offsets, 2.0 * tl.load(x_ptr + offsets, mask=ok), mask=ok)


@triton.jit
def mismatched_dot(x_ptr, BLOCK: tl.constexpr):
    a = tl.zeros([BLOCK, 16], tl.float32)
    b = tl.zeros([32, 16], tl.float32)  # inner dimensions 16 and 32: does not compile
    tl.store(x_ptr + tl.arange(0, 16), tl.sum(tl.dot(a, b), axis=0))


def aot_kernels():
    return [AotKernel("mismatched_dot", mismatched_dot, {"x_ptr": "*fp32"}, {"BLOCK": 16}),
            AotKernel("doubled", doubled, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128})]
'''


def test_failures_are_reported_per_kernel_and_set_the_exit_code(tmp_path):
    """A kernel that does not compile gets an "error" line and the next one still compiles; a
    module that is not there is skipped; one that fails to import is an error line."""
    (tmp_path / "aot_sample_kernels.py").write_text(BROKEN_KERNELS)
    (tmp_path / "aot_broken_import.py").write_text("raise ImportError('half-written module')\n")
    proc, records = run_aot_check(
        "--target=sm_80", "--modules=aot_absent_module,aot_broken_import,aot_sample_kernels",
        pythonpath=tmp_path)
    assert proc.returncode == 1
    assert "skipping aot_absent_module" in proc.stderr
    broken, bad, good = records
    assert broken["module"] == "aot_broken_import" and "half-written" in broken["error"]
    assert bad["kernel"] == "mismatched_dot" and bad["error"]
    assert good["kernel"] == "doubled" and "error" not in good
    assert good["registers"] > 0 and good["spill_bytes"] == 0 and good["mma"] == "none"
