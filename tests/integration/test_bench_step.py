"""tools/bench_step.py runs at tiny sizes on CPU and ends with a well-formed JSON line; its
compile runs compile outside the FLOP counter and count their graphs; a failure exits 1."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils._python_dispatch import _get_current_dispatch_mode

from tests.helpers import REPO

BENCH_STEP = os.path.join(REPO, "tools", "bench_step.py")
TINY = dict(preset="plain", arch="resnet18", batch_size=2, global_size=32, local_size=16,
            local_crops=2, steps=1, warmup=1, device="cpu", precision="fp32", num_classes=5)


def test_bench_step_tiny_cpu_run():
    cmd = [sys.executable, "tools/bench_step.py", "--arch=resnet18", "--batch_size=4",
           "--global_size=32", "--local_size=16", "--local_crops=2", "--steps=2", "--warmup=1",
           "--device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in result, result
    assert result["samples_per_s"] > 0 and result["gflop_per_sample"] > 0
    assert set(result["phase_ms"]) == {"prototypes", "forward+loss", "ema+enqueue", "backward",
                                       "optimizer"}
    assert 0 < result["mfu"] < 1.5  # utilisation of a rate measured on the same CPU


@pytest.mark.parametrize("decode", ["none", "gpu"])
def test_bench_gpu_stage_tiny_cpu_run(decode):
    """On the CPU, decode=gpu runs torchvision's CPU decoder in the stage: it must agree with
    itself exactly (on a GPU the same fields compare nvJPEG with the CPU decoder)."""
    cmd = [sys.executable, "tools/bench_gpu_stage.py", "--device=cpu", "--batch_size=2",
           "--max_resolution=64", "--steps=1", "--warmup=1", f"--decode={decode}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ms_per_batch"] > 0 and result["decode"] == decode
    assert result["out_shapes"] == [[2, 3, 224, 224], [16, 3, 96, 96]]
    if decode == "gpu":
        assert result["decode_images_per_s"] > 0 and result["jpeg_kib_mean"] > 0
        assert result["vs_cpu_decode_max_abs"] == 0


def _load_bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH_STEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_step():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: OpenMP's spinning slows tiny steps
    yield _load_bench_step()
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # no compiled frame outlives the test


class CompiledAsOnTorch211(torch.nn.Module):
    """torch.compile as torch 2.11's Dynamo behaves, without its cost: a module whose first
    call comes under a dispatch mode (such as FlopCounterMode) is skipped for good and runs
    eager from then on; otherwise its first call compiles one graph (issue 22, item 1)."""

    def __init__(self, module: torch.nn.Module, **compile_kwargs):
        super().__init__()
        self.module, self.outcome = module, None

    def forward(self, *args):
        if self.outcome is None:
            self.outcome = "skipped" if _get_current_dispatch_mode() is not None else "compiled"
            if self.outcome == "compiled":
                dynamo_counters["stats"]["unique_graphs"] += 1
        return self.module(*args)


def test_compile_counts_its_graphs_outside_the_flop_counter(bench_step, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", CompiledAsOnTorch211)
    bench_step.main(**TINY, compile=True, compile_backend="eager")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "error" not in record, record
    assert record["compile"] is True and record["compiled_graphs"] == 1
    assert record["gflop_per_sample"] > 0  # counted on the eager step


def test_a_compile_run_that_compiled_nothing_fails(bench_step, capsys):
    # as TORCHDYNAMO_DISABLE=1; torch's own patch restores its config (monkeypatch's undo left
    # `disable` unreadable for later tests in the same process)
    with torch._dynamo.config.patch(disable=True), pytest.raises(SystemExit) as exit_info:
        bench_step.main(**TINY, compile=True, compile_backend="eager")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "compiled no graph" in record["error"]
    assert "1 of 1 configuration(s) failed" in str(exit_info.value)  # a non-zero exit
