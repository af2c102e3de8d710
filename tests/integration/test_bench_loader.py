"""tools/bench_loader.py runs end to end at tiny sizes (as a subprocess, so it cannot rot)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "tools", "bench_loader.py")


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.ffcv
@pytest.mark.slow
def test_bench_runs_all_pipelines_back_to_back(tmp_path):
    proc = _run("--synthesize=48", f"--data={tmp_path}", "--pipeline=reference,ffcv,decode_only",
                "--batch_size=8", "--num_workers=1", "--steps=2", "--warmup=1", "--device=cpu",
                "--preset=demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines() if x.startswith("{")]
    by_name = {x["pipeline"]: x for x in lines[:-1]}
    assert set(by_name) == {"reference", "ffcv", "decode_only"}
    for result in by_name.values():
        assert result["samples_per_s"] > 0 and result["cpu_side_samples_per_s"] > 0
    ref = by_name["reference"]
    assert ref["samples_per_s"] == ref["cpu_side_samples_per_s"]
    summary = lines[-1]
    assert summary["pipeline"] == "reference,ffcv,decode_only"
    assert summary["ffcv_cpu_side_vs_reference"] > 0
    assert summary["ffcv_cpu_side_vs_decode_only"] > 0


def test_bench_reference_alone(demo_data):
    proc = _run(f"--data={demo_data}", "--pipeline=reference", "--batch_size=4",
                "--num_workers=0", "--steps=2", "--warmup=1", "--preset=demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_json(proc.stdout)
    assert result["pipeline"] == "reference" and result["samples_per_s"] > 0
    assert result["cpu_side_samples_per_s"] == result["samples_per_s"]


def test_bad_pipeline_name_fails_naming_the_accepted_values(tmp_path):
    proc = _run(f"--data={tmp_path}", "--pipeline=pil")
    assert proc.returncode != 0 and "accepted values" in proc.stderr


@pytest.mark.dali
def test_bench_dali_tiny_run(tmp_path):
    from pipelines import demo_data

    demo_data.write_dataset(str(tmp_path), train_per_class=2, val_per_class=1)
    proc = _run(f"--data={tmp_path}", "--pipeline=dali", "--batch_size=4", "--num_workers=1",
                "--steps=2", "--warmup=1", "--preset=demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_json(proc.stdout)
    assert result["pipeline"] == "dali" and result["samples_per_s"] > 0


@pytest.mark.ffcv
def test_bench_ffcv_gpu_decode_mode_tiny_run(tmp_path):
    proc = _run("--synthesize=32", f"--data={tmp_path}", "--pipeline=ffcv", "--decode=gpu",
                "--batch_size=8", "--num_workers=1", "--steps=2", "--warmup=1", "--preset=demo",
                "--device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_json(proc.stdout)
    assert result["decode"] == "gpu" and result["cpu_side_samples_per_s"] > 0
