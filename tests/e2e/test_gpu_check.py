"""tools/gpu_check.sh's dry run of every stage at tiny sizes, in a Python like the GPU image's.
What comes back from $OUT: at most 8 files, the logs packed in one tar."""
import json
import os
import re
import time

import pytest

from tests import _gpu_check as gc


@pytest.mark.slow
@pytest.mark.xfail(not gc.stage_has_impl_flag(), strict=True,
                   reason="tools/bench_gpu_stage.py has no --impl flag yet: its stages fail")
def test_dry_run_as_on_the_gpu_image_runs_every_stage_prewarmed(tmp_path):
    """The one dry run (about a minute and a half here): fire, ffcv and DALI cannot be imported,
    as on the GPU image; every stage passes; the pre-warm launched every Triton kernel variant
    (kernel and specialisation key) that any later stage launched (issue 22, item 2)."""
    launch_log = tmp_path / "launches.jsonl"
    start = time.perf_counter()
    proc = gc.run(tmp_path / "out", "--dry-run", TREX_TRITON_LAUNCHES=str(launch_log),
                  PYTHONPATH=os.pathsep.join(filter(None, [gc.GPU_IMAGE,
                                                           os.environ.get("PYTHONPATH")])))
    print(f"dry run: {time.perf_counter() - start:.0f} s")
    out = tmp_path / "out"
    records = gc.records(out)
    assert list(records) == gc.ORDER, proc.stdout[-3000:]
    for name, (rc, _seconds, _limit, *note) in records.items():
        assert rc == "0", (name, rc, note, proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:]
    files = gc.returned_files(out)
    assert set(files) == gc.OUT_FILES and len(files) <= 8

    members = gc.tar_members(out)
    assert {"env.txt", "plan.txt", "stages.txt", "summary.md"} <= set(members)
    assert {f"logs/{n}.log" for n in gc.ORDER} | {f"{n}.jsonl" for n in gc.ORDER} <= set(members)
    assert members["stages.txt"] == (out / "stages.txt").read_bytes()
    assert b"=== " not in members["logs/bench_kernel.log"]  # one stage's output per log
    assert b'"impl": "triton"' in members["bench_kernel.jsonl"]
    compiled = json.loads(members["bench_step_bs256_compile.jsonl"].splitlines()[-1])
    assert compiled["compiled_graphs"] >= 1 and compiled["samples_per_s"] > 0
    env = members["env.txt"].decode()
    assert b"cuda " in members["env.txt"] and b"auto " in members["env.txt"]
    assert re.search(r"^ffcv +no ", env, re.M) and re.search(r"^dali +no ", env, re.M)  # hook
    summary = (out / "summary.md").read_text()
    assert f"## Stages ({len(gc.ORDER)} of {len(gc.ORDER)} recorded, none failed)" in summary
    assert "## Multi-crop stage" in summary and "## Projection" in summary

    prewarm_log = members["logs/triton_prewarm.log"].decode()
    jobs, width = re.search(r"pre-warm: (\d+) jobs, at most (\d+) at once, 0 failed",
                            prewarm_log).groups()
    assert int(jobs) == 5 and int(width) == len(os.sched_getaffinity(0))  # nproc, in parallel
    launches = gc.launches_by_stage(launch_log)
    prewarmed = launches.pop("triton_prewarm")
    assert {"bench_step_bs256", "bench_kernel", "bench_gpu_stage_triton",
            "bench_gpu_stage_nvjpeg", "bench_step_bs64", "bench_step_bs256_compile"} <= set(
        launches)  # the check below is not vacuous
    for stage, launched in launches.items():
        assert launched <= prewarmed, (stage, sorted(launched - prewarmed)[:3])
