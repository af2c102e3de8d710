"""What collecting the GPU tests imports (issue 22, item 10): `pytest -m gpu` on the GPU image
must not depend on numba, whose build there may not match the image's numpy. A broken numba
raises ImportError at import; here an import hook raises it for every numba module, and the
modules that hold gpu-marked tests (with the conftest and tests.helpers they import) must still
import, without even asking for numba. One subprocess, so that a numba this process already
holds does not hide an import; its cost is mostly importing torch.
"""
import glob
import os
import subprocess
import sys

from tests.helpers import REPO


def _gpu_test_modules() -> list[str]:
    """The conftests, tests.helpers and every test module (any layer) that holds a gpu-marked
    test, as dotted module names."""
    tests = os.path.join(REPO, "tests")
    conftests = sorted(glob.glob(os.path.join(tests, "**", "conftest.py"), recursive=True))
    found = []
    for path in sorted(glob.glob(os.path.join(tests, "**", "test_*.py"), recursive=True)):
        if os.path.samefile(path, __file__):  # this module names the marker; it holds none
            continue
        with open(path) as f:
            if "mark.gpu" in f.read():
                found.append(path)
    names = [os.path.relpath(p, REPO)[:-3].replace(os.sep, ".") for p in (*conftests, *found)]
    return [*names[:len(conftests)], "tests.helpers", *names[len(conftests):]]


_NUMBA_BROKEN = """
import importlib, importlib.abc, sys

class NumbaBroken(importlib.abc.MetaPathFinder):
    tried = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "numba":
            NumbaBroken.tried.append(name)
            raise ImportError("numba is broken here (as a numba/numpy mismatch would be)")

sys.meta_path.insert(0, NumbaBroken())
for module in sys.argv[1:]:
    importlib.import_module(module)
print("imported; numba asked for by:", NumbaBroken.tried)
"""


def test_gpu_test_modules_import_without_numba():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    modules = _gpu_test_modules()
    assert "tests.unit.test_gpu" in modules and "tests.conftest" in modules
    assert not [m for m in modules if m.endswith("test_gpu_collection")]
    proc = subprocess.run([sys.executable, "-c", _NUMBA_BROKEN, *modules], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "imported; numba asked for by: []"


def test_pytest_starts_without_pytest_xdist():
    """The GPU image has pytest but not pytest-xdist: the project's pytest configuration
    (pyproject.toml addopts, tests/conftest.py hooks) must not need it; `-n 2` is only the
    README's and CI's command."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p",
                           "no:cacheprovider", "-q", "-m", "gpu", "tests/unit/test_atomic.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]  # 5: none selected
    assert "error" not in (proc.stdout + proc.stderr).lower()
