"""tools/gpu_check.sh run from the tests: its environment, what a run leaves in $OUT (stages.txt,
the returned files, the packed logs) and the Triton launches the dry run records."""
import json
import os
import re
import subprocess
import sys
import tarfile

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
GPU_IMAGE = os.path.join(REPO, "tests", "gpu_image")  # a sitecustomize: no fire, ffcv, DALI
ORDER = ["triton_prewarm", "bench_step_bs256", "bench_kernel", "bench_gpu_stage_triton",
         "bench_gpu_stage_torch", "bench_gpu_stage_nvjpeg", "gpu_tests", "bench_step_bs64",
         "bench_step_bs256_compile"]
OUT_FILES = {"summary.md", "stages.txt", "gpu_check.tar.gz"}


def stage_has_impl_flag() -> bool:
    source = open(os.path.join(REPO, "tools", "bench_gpu_stage.py")).read()
    return re.search(r"\bimpl\s*:\s*str", source) is not None


def env(out, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPU_CHECK_") and k != "TRITON_INTERPRET"}
    return {**env, "OUT": str(out), "PYTHON": sys.executable, **extra}


def run(out, *args, timeout=600, **extra):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=REPO,
                          env=env(out, **extra), timeout=timeout)


def records(out) -> dict[str, list[str]]:
    lines = (out / "stages.txt").read_text().splitlines()
    return {line.split()[0]: line.split(maxsplit=4)[1:] for line in lines}


def returned_files(out) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out)
                  for d, _, files in os.walk(out) for f in files)


def tar_members(out) -> dict[str, bytes]:
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {os.path.normpath(m.name): tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile()}


def launches_by_stage(path) -> dict[str, set[str]]:
    """Triton launches by stage: {stage: {json of kernel and specialisation key}}."""
    by_stage: dict[str, set[str]] = {}
    for line in open(path).read().splitlines():
        launch = json.loads(line)
        by_stage.setdefault(launch.pop("stage"), set()).add(json.dumps(launch, sort_keys=True))
    return by_stage
