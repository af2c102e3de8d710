"""tools/bench_step.py runs at tiny sizes on CPU and ends with a well-formed JSON line."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
