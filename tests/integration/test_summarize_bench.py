"""tools/summarize_bench.py on fabricated gpu_check.sh output: the figures in summary.md are
the ones computed here by hand from the same JSON lines."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

IMAGES = 100 * 1_281_167

STEP = {"bench": "step", "device_name": "NVIDIA H200", "arch": "resnet50", "precision": "bf16",
        "loss_impl": "triton", "mfu": 0.3512, "matmul_tflops": 700.0, "peak_mem_gib": 41.2}


def _write(folder, name, lines):
    (folder / name).write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def run_folder(tmp_path):
    rows = {
        "bench_step_bs256": [dict(STEP, batch_size=256, compile=False, samples_per_s=2000.0,
                                  step_ms=128.0)],
        "bench_step_bs64": [dict(STEP, batch_size=64, compile=False, samples_per_s=1600.0,
                                 step_ms=40.0)],
        "bench_step_bs256_compile": [{"bench": "step", "compile": True,
                                      "error": "BackendCompilerFailed: boom"}],
        "bench_gpu_stage_triton": [{"bench": "gpu_stage", "impl": "triton", "decode": "none",
                                    "batch_size": 256, "ms_per_batch": 3.2}],
        "bench_gpu_stage_nvjpeg": [{"bench": "gpu_stage", "impl": "triton", "decode": "gpu",
                                    "batch_size": 256, "ms_per_batch": 6.4,
                                    "decode_ms_per_batch": 3.0}],
        "bench_kernel": [{"impl": "triton", "status": "ok", "n": 2304, "c": 1000, "d": 256,
                          "dtype": "bfloat16", "fwd_ms": 0.1, "bwd_ms": 0.2, "total_ms": 0.3,
                          "speedup_vs_torch": 2.5, "reason": None}],
        "aot_check": [{"kernel": "_forward_kernel", "registers": 128, "spill_bytes": 0}],
    }
    for stage, lines in rows.items():
        _write(tmp_path, f"{stage}.jsonl", [json.dumps(r) for r in lines])
    # a line cut off by a time limit, after a complete one
    with open(tmp_path / "bench_kernel.jsonl", "a") as f:
        f.write('{"impl": "torch", "status": "o\n')
    _write(tmp_path, "plan.txt", ["bench_step_bs256 60", "bench_kernel 65", "gpu_tests 45",
                                  "bench_step_bs256_compile 145"])
    _write(tmp_path, "stages.txt", ["bench_step_bs256 0 31 60", "bench_kernel 124 65 65 timed out",
                                    "gpu_tests skip 0 45 pytest is not installed"])
    _write(tmp_path, "env.txt", ["mode: gpu", "cuda: yes  NVIDIA H200"])
    return tmp_path


def _summary(folder) -> str:
    proc = subprocess.run([sys.executable, "tools/summarize_bench.py", str(folder)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{text}")


def test_stage_records_failures_and_stages_not_reached(run_folder):
    text = _summary(run_folder)
    assert "## Stages (3 of 4 recorded, 1 failed: bench_kernel)" in text
    assert _row(text, "bench_kernel")[:5] == ["bench_kernel", "124", "65", "65", "timed out"]
    assert _row(text, "bench_step_bs256_compile")[1:] == ["-", "-", "145", "not reached"]
    assert "mode: gpu" in text


def test_step_table_has_samples_per_s_and_mfu_per_configuration(run_folder):
    text = _summary(run_folder)
    step = text.split("## Training step")[1].split("##")[0]
    row = _row(step, "bench_step_bs256")
    assert row[1:9] == ["resnet50", "256", "bf16", "False", "triton", "2000.0", "128.0", "35.1"]
    assert "BackendCompilerFailed: boom" in _row(step, "bench_step_bs256_compile")[-1]


def test_stage_share_is_stage_ms_over_the_step_at_the_same_batch_size(run_folder):
    text = _summary(run_folder)
    crops = text.split("## Multi-crop stage")[1].split("##")[0]
    assert _row(crops, "bench_gpu_stage_triton")[-1] == f"{100 * 3.2 / 128.0:.1f}% of 128.0 ms"
    assert _row(crops, "bench_gpu_stage_nvjpeg")[-1] == f"{100 * 6.4 / 128.0:.1f}% of 128.0 ms"


def test_projection_of_100_epochs_on_1_and_8_gpus(run_folder):
    text = _summary(run_folder)
    projection = text.split("## Projection")[1].split("##")[0]
    assert "| per step | ms | 1 x NVIDIA H200 | 8 x NVIDIA H200 |" in projection
    for first, ms in (("step alone (crops already on the device)", 128.0),
                      ("step + bench_gpu_stage_triton", 131.2),
                      ("step + bench_gpu_stage_nvjpeg", 134.4)):
        hours = IMAGES / 256 * ms / 1000 / 3600
        assert _row(projection, first)[1:] == [str(ms), f"{hours:.1f} h", f"{hours / 8:.1f} h"]


def test_kernel_other_lines_and_cut_off_lines(run_folder):
    text = _summary(run_folder)
    kernel = text.split("## Fused prototype CE")[1].split("##")[0]
    assert _row(kernel, "2304")[4:10] == ["triton", "ok", "0.1", "0.2", "0.3", "2.5"]
    assert "_forward_kernel" in text.split("## Other JSON lines")[1]
    assert "bench_kernel.jsonl: 1 cut-off JSON line(s) skipped" in text


def test_a_folder_with_nothing_measured_still_summarizes(tmp_path):
    _write(tmp_path, "stages.txt", ["bench_step_bs256 1 3 60"])
    (tmp_path / "bench_step_bs256.jsonl").write_text("")
    text = _summary(tmp_path)
    assert "1 failed: bench_step_bs256" in text and "## Projection" not in text


def test_a_stage_whose_json_reports_a_failure_is_failed_even_with_exit_0(tmp_path):
    """Issue 22, item 4: before the benchmarks exited 1 on an error record, stages.txt said 0."""
    _write(tmp_path, "bench_step_bs256_compile.jsonl",
           [json.dumps({"bench": "step", "compile": True, "error": "RuntimeError: no graph"})])
    _write(tmp_path, "bench_kernel.jsonl",
           [json.dumps({"impl": "triton", "status": "error", "total_ms": None, "n": 8, "c": 5,
                        "reason": "OutOfMemoryError: CUDA out of memory"})])
    _write(tmp_path, "bench_gpu_stage_torch.jsonl",
           [json.dumps({"bench": "gpu_stage", "impl": "torch", "ms_per_batch": 2.0})])
    _write(tmp_path, "stages.txt", ["bench_step_bs256_compile 0 40 120",
                                    "bench_kernel 0 30 65", "bench_gpu_stage_torch 0 9 15"])
    text = _summary(tmp_path)
    assert "1 failed" not in text
    assert "(3 of 3 recorded, 2 failed: bench_step_bs256_compile, bench_kernel)" in text
    assert _row(text, "bench_kernel")[4] == "a JSON line reports a failure"
    assert _row(text, "bench_gpu_stage_torch")[4] == ""
