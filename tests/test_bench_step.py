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


def test_summary_tables_and_projection(tmp_path):
    row = {"bench": "step", "device_name": "cpu", "arch": "resnet50", "batch_size": 64,
           "samples_per_s": 1500.0, "mfu": 0.2}
    (tmp_path / "bench_step.jsonl").write_text(json.dumps(row) + "\n")
    proc = subprocess.run([sys.executable, "tools/summarize_bench.py", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| resnet50 | 64 |" in proc.stdout
    hours_one = 100 * 1_281_167 / 1500.0 / 3600
    assert f"1 x cpu: {hours_one:.1f} h" in proc.stdout


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
