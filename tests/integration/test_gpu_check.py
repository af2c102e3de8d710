"""tools/gpu_check.sh proven on the CPU before a GPU window is spent on it: its plan (order and
time budget), a dry run of every stage at tiny sizes in a Python like the GPU image's, a forced
failure, and an interruption. Each run checks what comes back from $OUT: at most 8 files, the
logs packed in one tar."""
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
GPU_IMAGE = os.path.join(REPO, "tests", "gpu_image")  # a sitecustomize: no fire, ffcv, DALI
ORDER = ["triton_prewarm", "bench_step_bs256", "bench_kernel", "bench_gpu_stage_triton",
         "bench_gpu_stage_torch", "bench_gpu_stage_nvjpeg", "gpu_tests", "bench_step_bs64",
         "bench_step_bs256_compile"]
OUT_FILES = {"summary.md", "stages.txt", "gpu_check.tar.gz"}
BUDGET, RERUN_BUDGET, WINDOW, MACHINE_START = 480, 200, 900, 180  # s


def _stage_has_impl_flag() -> bool:
    source = open(os.path.join(REPO, "tools", "bench_gpu_stage.py")).read()
    return re.search(r"\bimpl\s*:\s*str", source) is not None


def _env(out, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPU_CHECK_") and k != "TRITON_INTERPRET"}
    return {**env, "OUT": str(out), "PYTHON": sys.executable, **extra}


def _run(out, *args, timeout=600, **extra):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=REPO,
                          env=_env(out, **extra), timeout=timeout)


def _records(out) -> dict[str, list[str]]:
    lines = (out / "stages.txt").read_text().splitlines()
    return {line.split()[0]: line.split(maxsplit=4)[1:] for line in lines}


def _returned_files(out) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out)
                  for d, _, files in os.walk(out) for f in files)


def _tar_members(out) -> dict[str, bytes]:
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {os.path.normpath(m.name): tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile()}


def _plan(proc) -> tuple[dict[str, int], set[str], int, int]:
    """(limits by stage, stages skipped, setup s, per-stage overhead s) from --plan, checking
    its total line against them."""
    python, *stages, overheads, total = proc.stdout.splitlines()
    assert python.startswith("python ")
    limits = {line.split()[0]: int(line.split()[1]) for line in stages}
    skipped = {line.split()[0] for line in stages if line.endswith(" skip")}
    setup, per_stage = (int(w.strip(",")) for w in overheads.split()[1::3])
    ran = [limits[n] for n in limits if n not in skipped]
    spent = setup + sum(ran) + per_stage * len(ran)
    assert total.startswith(f"total {spent} (limits {sum(ran)}; budget "), proc.stdout
    return limits, skipped, setup, per_stage


def _plan_checkout(tmp_path, limits: dict[str, int] | None = None, venv: bool = False):
    """A checkout holding only tools/gpu_check.sh (--plan needs nothing else), its stage limits
    changed as asked, with a .venv/bin/python when `venv`."""
    text = open(SCRIPT).read()
    for name, limit in (limits or {}).items():
        text, n = re.subn(rf"stage {name} \d+ ", f"stage {name} {limit} ", text)
        assert n == 1, name
    (tmp_path / "tools").mkdir(parents=True)
    (tmp_path / "tools" / "gpu_check.sh").write_text(text)
    if venv:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    return str(tmp_path / "tools" / "gpu_check.sh")


def test_plan_orders_stages_by_value_within_the_budget(tmp_path):
    proc = _run(tmp_path, "--plan")
    assert proc.returncode == 0, proc.stderr
    limits, skipped, setup, per_stage = _plan(proc)
    assert list(limits) == ORDER and not skipped
    assert "aot_check" not in limits  # it needs no GPU: CI runs it (issue 22, item 2)
    assert limits["bench_step_bs256_compile"] > 90  # a cold ResNet-50 compile takes longer
    assert not tmp_path.joinpath("summary.md").exists()  # --plan runs nothing


def test_the_total_holds_every_second_and_the_window_holds_a_rerun(tmp_path):
    """Issue 22, item 3: the env probe, packing, kill grace and every stage are in the printed
    total, which is at most 480 s, and 15 minutes hold the machine's start, the run and one
    rerun; the script refuses a plan above its budget (before: the probe's 60 s and the last
    stage's 'at least 130 s, or what is left' were outside it)."""
    source = open(SCRIPT).read()
    proc = _run(tmp_path, "--plan")
    limits, _, setup, per_stage = _plan(proc)
    total = setup + sum(limits.values()) + per_stage * len(limits)
    assert total <= BUDGET and MACHINE_START + BUDGET + RERUN_BUDGET <= WINDOW - 40
    constants = dict(re.findall(r"\b([A-Z_]+)=(\d+)\b", source))
    assert setup >= (int(constants["PROBE_LIMIT"]) + int(constants["NVSMI_LIMIT"])
                     + int(constants["KILL_GRACE"]) + 2 * int(constants["PACK_LIMIT"]))
    assert per_stage == int(constants["KILL_GRACE"]) + int(constants["PACK_LIMIT"])
    assert 'timeout -k "$KILL_GRACE" "$probe_limit" "$PY" -m trex_fast.env' in source
    assert "REST_STAGE" not in source  # no stage may outgrow its planned limit

    over = _plan_checkout(tmp_path / "over", {"bench_kernel": limits["bench_kernel"]
                                              + BUDGET - total + 1})
    proc = subprocess.run(["bash", over, "--plan"], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"the plan can spend {BUDGET + 1}s: more than its {BUDGET}s budget\n"

    rerun = _run(tmp_path, "--plan", GPU_CHECK_ONLY="bench_step_bs256_compile")
    assert rerun.returncode == 0, rerun.stderr  # the slowest stage alone fits a rerun
    _, skipped, _, _ = _plan(rerun)
    assert skipped == set(ORDER) - {"bench_step_bs256_compile"}
    rerun = _run(tmp_path, "--plan", GPU_CHECK_ONLY=",".join(ORDER))
    assert rerun.returncode == 2 and f"than its {RERUN_BUDGET}s budget" in rerun.stderr


@pytest.mark.parametrize("venv", [True, False])
def test_the_checkouts_venv_is_the_default_python(tmp_path, venv):
    """Issue 22, item 10: a checkout set up by the README (tools/setup_env.sh makes .venv) runs
    the dry run with .venv/bin/python, not the system python3 that has no torch."""
    script = _plan_checkout(tmp_path, venv=venv)
    env = {k: v for k, v in _env(tmp_path).items() if k != "PYTHON"}
    proc = subprocess.run(["bash", script, "--plan"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == ("python .venv/bin/python" if venv else
                                           "python python3")
    proc = subprocess.run(["bash", script, "--plan"], capture_output=True, text=True,
                          env={**env, "PYTHON": "/opt/py"}, timeout=60)
    assert proc.stdout.splitlines()[0] == "python /opt/py"


def test_unknown_stage_names_are_refused_before_anything_runs(tmp_path):
    proc = _run(tmp_path, "--dry-run", GPU_CHECK_FAIL_STAGE="bench_stepp")
    assert proc.returncode == 2 and "unknown stage 'bench_stepp'" in proc.stderr
    proc = _run(tmp_path, "--dry-run", GPU_CHECK_ONLY="gpu_tests,nope")
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr
    assert _returned_files(tmp_path) == []


def _launches(path) -> dict[str, set[str]]:
    """Triton launches by stage: {stage: {json of kernel and specialisation key}}."""
    by_stage: dict[str, set[str]] = {}
    for line in open(path).read().splitlines():
        launch = json.loads(line)
        by_stage.setdefault(launch.pop("stage"), set()).add(json.dumps(launch, sort_keys=True))
    return by_stage


@pytest.mark.slow
@pytest.mark.xfail(not _stage_has_impl_flag(), strict=True,
                   reason="tools/bench_gpu_stage.py has no --impl flag yet: its stages fail")
def test_dry_run_as_on_the_gpu_image_runs_every_stage_prewarmed(tmp_path):
    """The one dry run (about a minute and a half here): fire, ffcv and DALI cannot be imported,
    as on the GPU image; every stage passes; the pre-warm launched every Triton kernel variant
    (kernel and specialisation key) that any later stage launched (issue 22, item 2)."""
    launch_log = tmp_path / "launches.jsonl"
    start = time.perf_counter()
    proc = _run(tmp_path / "out", "--dry-run", TREX_TRITON_LAUNCHES=str(launch_log),
                PYTHONPATH=os.pathsep.join(filter(None, [GPU_IMAGE,
                                                         os.environ.get("PYTHONPATH")])))
    print(f"dry run: {time.perf_counter() - start:.0f} s")
    out = tmp_path / "out"
    records = _records(out)
    assert list(records) == ORDER, proc.stdout[-3000:]
    for name, (rc, _seconds, _limit, *note) in records.items():
        assert rc == "0", (name, rc, note, proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:]
    files = _returned_files(out)
    assert set(files) == OUT_FILES and len(files) <= 8

    members = _tar_members(out)
    assert {"env.txt", "plan.txt", "stages.txt", "summary.md"} <= set(members)
    assert {f"logs/{n}.log" for n in ORDER} | {f"{n}.jsonl" for n in ORDER} <= set(members)
    assert members["stages.txt"] == (out / "stages.txt").read_bytes()
    assert b"=== " not in members["logs/bench_kernel.log"]  # one stage's output per log
    assert b'"impl": "triton"' in members["bench_kernel.jsonl"]
    compiled = json.loads(members["bench_step_bs256_compile.jsonl"].splitlines()[-1])
    assert compiled["compiled_graphs"] >= 1 and compiled["samples_per_s"] > 0
    env = members["env.txt"].decode()
    assert b"cuda " in members["env.txt"] and b"auto " in members["env.txt"]
    assert re.search(r"^ffcv +no ", env, re.M) and re.search(r"^dali +no ", env, re.M)  # hook
    summary = (out / "summary.md").read_text()
    assert f"## Stages ({len(ORDER)} of {len(ORDER)} recorded, none failed)" in summary
    assert "## Multi-crop stage" in summary and "## Projection" in summary

    prewarm_log = members["logs/triton_prewarm.log"].decode()
    jobs, width = re.search(r"pre-warm: (\d+) jobs, at most (\d+) at once, 0 failed",
                            prewarm_log).groups()
    assert int(jobs) == 5 and int(width) == len(os.sched_getaffinity(0))  # nproc, in parallel
    launches = _launches(launch_log)
    prewarmed = launches.pop("triton_prewarm")
    assert {"bench_step_bs256", "bench_kernel", "bench_gpu_stage_triton",
            "bench_gpu_stage_nvjpeg", "bench_step_bs64", "bench_step_bs256_compile"} <= set(
        launches)  # the check below is not vacuous
    for stage, launched in launches.items():
        assert launched <= prewarmed, (stage, sorted(launched - prewarmed)[:3])


@pytest.mark.slow
def test_a_failing_stage_is_recorded_with_its_own_exit_code_and_the_rest_still_run(tmp_path):
    proc = _run(tmp_path, "--dry-run", GPU_CHECK_FAIL_STAGE="bench_step_bs256",
                GPU_CHECK_ONLY="bench_step_bs256,bench_kernel")
    assert proc.returncode == 1, proc.stdout[-3000:]
    records = _records(tmp_path)
    assert list(records) == ORDER
    assert records["bench_step_bs256"][0] == "3"
    assert records["bench_kernel"][0] == "0"  # ran after the failure
    assert all(records[n][0] == "skip" for n in set(ORDER) - {"bench_step_bs256",
                                                              "bench_kernel"})
    assert "1 failed: bench_step_bs256" in (tmp_path / "summary.md").read_text()
    assert b"fails on purpose" in _tar_members(tmp_path)["logs/bench_step_bs256.log"]
    assert set(_returned_files(tmp_path)) == OUT_FILES


@pytest.mark.slow
def test_an_interrupted_run_records_the_running_stage_and_keeps_its_log(tmp_path):
    proc = subprocess.Popen(["bash", SCRIPT, "--dry-run"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(tmp_path, GPU_CHECK_ONLY="bench_step_bs256"))
    try:
        for line in proc.stdout:
            if line.startswith("=== bench_step_bs256 ("):
                break
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.stdout.close()
    rc, _, _, note = _records(tmp_path)["bench_step_bs256"]
    assert (rc, note) == ("143", "interrupted")
    assert "logs/bench_step_bs256.log" in _tar_members(tmp_path)
    assert set(_returned_files(tmp_path)) == OUT_FILES
