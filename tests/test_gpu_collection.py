"""What collecting the GPU tests imports (issue 22, item 10): `pytest -m gpu` on the GPU image
must not depend on numba, whose build there may not match the image's numpy. A broken numba
raises ImportError at import; here an import hook raises it for every numba module, and the
modules that hold gpu-marked tests (with the conftest and tests.helpers they import) must still
import. One subprocess, so that the numba this process may hold already does not hide an import.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TEST_MODULES = ("tests.conftest", "tests.helpers", "tests.test_gpu", "tests.test_overlap",
                    "tests.test_costcount", "tests.test_multicrop_kernels")

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
    proc = subprocess.run([sys.executable, "-c", _NUMBA_BROKEN, *GPU_TEST_MODULES], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "imported; numba asked for by: []"
