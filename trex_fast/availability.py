"""The one place that decides which optional back-ends are usable (DESIGN.md), and the only
decider of every "auto" flag (resolve_*; trex_fast.plan asks them once per run).

Nothing here imports ffcv, DALI, Triton or torchvision at module import: each probe imports
lazily and caches its answer, so `import trex_fast` costs torch alone. Each probe_* function
returns a Probe, the answer and the reason for it; `python -m trex_fast.env` prints them, and
the has_* functions that the loaders and the test markers ask are the same probes' answers.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass

import torch

# the extra that installs each back-end (setup.py)
DALI_EXTRAS = {13: "dali", 12: "dali-cuda12"}


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    why: str


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import_error(module: str) -> str | None:
    """None when `module` imports; else why not (a compiled extension can be installed yet
    fail to load, so finding it is not enough)."""
    if not _importable(module):
        return f"{module} is not installed"
    try:
        importlib.import_module(module)
    except Exception as e:  # any failure to load means "not usable"
        return f"{module} fails to import: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def _dist_version(*names: str) -> tuple[str, str] | None:
    """(distribution name, version) of the first installed distribution among `names`."""
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed NVIDIA driver supports, from libcuda itself
    (cuDriverGetVersion, 1000 * major + 10 * minor); None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000, version.value % 1000 // 10


def _driver_text() -> str:
    driver = driver_cuda_version()
    return ("no NVIDIA driver (libcuda.so.1 not found)" if driver is None
            else f"the driver supports CUDA {driver[0]}.{driver[1]}")


@functools.cache
def probe_cuda() -> Probe:
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return Probe("cuda", False, f"{build} is a CPU-only build")
    build += f" (built for CUDA {torch.version.cuda})"
    if not torch.cuda.is_available():
        return Probe("cuda", False, f"{build} sees no device; {_driver_text()}")
    props = torch.cuda.get_device_properties(0)
    return Probe("cuda", True, f"{torch.cuda.device_count()} device(s), cuda:0 = {props.name} "
                 f"(sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB); "
                 f"{build}; {_driver_text()}")


@functools.cache
def probe_bf16() -> Probe:
    if not probe_cuda().ok:
        return Probe("bf16", False, "no CUDA device: precision=auto is fp32 on the CPU")
    major, minor = torch.cuda.get_device_capability(0)
    if major >= 8:
        return Probe("bf16", True, f"sm_{major}{minor} has bf16 tensor cores: precision=auto "
                     "is bf16 autocast")
    return Probe("bf16", False, f"sm_{major}{minor} has no bf16 tensor cores (precision=auto "
                 "still picks bf16 on CUDA): pass --precision=fp16")


@functools.cache
def probe_ffcv() -> Probe:
    error = _import_error("ffcv")
    if error:
        return Probe("ffcv", False, f"{error}; pip install -e '.[ffcv]' (tools/setup_env.sh "
                     "installs what it compiles against)")
    dist = _dist_version("ffcv")
    return Probe("ffcv", True, f"ffcv {dist[1] if dist else '?'}: --pipeline=ffcv")


def _dali_dist() -> tuple[str, str, int | None] | None:
    """(distribution, version, CUDA major it is built for) of the installed DALI wheel."""
    dist = _dist_version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali")
    if dist is None:
        return None
    match = re.search(r"cuda(\d+)0$", dist[0])
    return dist[0], dist[1], int(match.group(1)) if match else None


@functools.cache
def probe_dali() -> Probe:
    error = _import_error("nvidia.dali")
    if error:
        return Probe("dali", False, f"{error}; pip install -e '.[dali]' (CUDA 13 driver) or "
                     "'.[dali-cuda12]' (CUDA 12 driver)")
    dist = _dali_dist()
    name = f"{dist[0]} {dist[1]}" if dist else "nvidia-dali"
    return Probe("dali", True, f"{name}: CPU pipelines (device_id=None)")


@functools.cache
def probe_dali_gpu() -> Probe:
    if not probe_dali().ok:
        return Probe("dali_gpu", False, "DALI is not usable (see dali)")
    if not probe_cuda().ok:
        return Probe("dali_gpu", False, "no CUDA device: DALI runs in CPU mode only")
    dist, driver = _dali_dist(), driver_cuda_version()
    if dist and dist[2] and driver and driver[0] < dist[2]:
        return Probe("dali_gpu", False, f"{dist[0]} needs a CUDA {dist[2]} driver but "
                     f"{_driver_text()}: pip install -e '.[{DALI_EXTRAS.get(driver[0], 'dali')}]'")
    return Probe("dali_gpu", True, f"GPU mode ('mixed' nvJPEG decode) on cuda:0; "
                 f"{_driver_text()}")


@functools.cache
def probe_triton() -> Probe:
    error = _import_error("triton")
    if error:
        return Probe("triton", False, f"{error}: loss_impl=auto and the multi-crop stage are "
                     "torch")
    import triton

    if not probe_cuda().ok:
        return Probe("triton", False, f"triton {triton.__version__} is installed but there is no "
                     "CUDA device: its kernels run only in the interpreter (TRITON_INTERPRET=1, "
                     "the tests); loss_impl=auto and the multi-crop stage are torch")
    major, minor = torch.cuda.get_device_capability(0)
    return Probe("triton", True, f"triton {triton.__version__}: the fused kernels compile for "
                 f"sm_{major}{minor}; loss_impl=auto and the multi-crop stage are triton")


@functools.cache
def probe_nvjpeg() -> Probe:
    """torchvision.io.decode_jpeg on CUDA (nvJPEG), tried on a tiny JPEG encoded here."""
    if not probe_cuda().ok:
        return Probe("nvjpeg", False, "no CUDA device: FFCV's decode=auto decodes on the CPU")
    try:
        import torchvision
        from torchvision.io import decode_jpeg, encode_jpeg

        jpeg = encode_jpeg(torch.full((3, 16, 24), 128, dtype=torch.uint8))
        image = decode_jpeg(jpeg, device="cuda")
        torch.cuda.synchronize()
    except Exception as e:  # any failure means nvJPEG is not usable here
        return Probe("nvjpeg", False, f"torchvision decode_jpeg on CUDA failed "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); FFCV's decode=auto "
                     "still picks gpu on CUDA: pass --decode=cpu")
    if tuple(image.shape) != (3, 16, 24):
        return Probe("nvjpeg", False, f"decode_jpeg on CUDA gave shape {tuple(image.shape)}")
    return Probe("nvjpeg", True, f"torchvision {torchvision.__version__} decode_jpeg on CUDA "
                 "works: FFCV's decode=auto decodes on the GPU")


PROBES = (probe_cuda, probe_bf16, probe_ffcv, probe_dali, probe_dali_gpu, probe_triton,
          probe_nvjpeg)


def has_ffcv() -> bool:
    return probe_ffcv().ok


def has_dali() -> bool:
    return probe_dali().ok


@functools.cache
def has_triton() -> bool:
    return _importable("triton")


def has_cuda() -> bool:
    return torch.cuda.is_available()


class UnavailableError(RuntimeError):
    """What the flags ask for is not usable here (a back-end, CUDA); the message says why."""


def require(name: str, available: bool, extra: str) -> None:
    """Raise a clear error naming the missing back-end and how to install it."""
    if not available:
        raise UnavailableError(
            f"{name} is not installed or failed to import; install it with "
            f"`pip install -e '.[{extra}]'` (tools/setup_env.sh installs everything)"
        )


# ---------------------------------------------------------------------------------------------
# the deciders of every "auto" flag (trex_fast.plan asks them once per run)
# ---------------------------------------------------------------------------------------------
def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """--device: auto = this process's GPU (cuda:LOCAL_RANK) when CUDA works, else the CPU."""
    if flag == "auto":
        return torch.device("cuda", local_rank) if has_cuda() else torch.device("cpu")
    device = torch.device(flag)
    if device.type == "cuda":
        if not has_cuda():
            raise UnavailableError(f"--device={flag!r} but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_precision(flag: str, device: torch.device) -> str:
    """--precision: auto = bf16 autocast on CUDA, fp32 on the CPU."""
    if flag == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return flag


def kernel_impl(device: torch.device | str) -> str:
    """What every kernel "auto" resolves to, the loss and the multi-crop stage alike (so they
    fall back together): "triton" on a GPU where Triton imports (probe_triton), else "torch"."""
    return "triton" if torch.device(device).type == "cuda" and probe_triton().ok else "torch"


def resolve_loss_impl(flag: str, device: torch.device | str) -> str:
    """--loss_impl: auto = kernel_impl (the fused Triton kernel, or the torch reference)."""
    if flag not in ("auto", "torch", "triton"):
        raise ValueError(f"loss_impl={flag!r} is not one of ('auto', 'torch', 'triton')")
    return kernel_impl(device) if flag == "auto" else flag


def resolve_pipeline(flag: str, root: str) -> str:
    """--pipeline: auto = ffcv if the data holds train.beton, dali if it holds dali/, else the
    reference pipeline on an ImageFolder."""
    if flag != "auto":
        return flag
    if os.path.isfile(os.path.join(root, "train.beton")):
        return "ffcv"
    if os.path.isdir(os.path.join(root, "dali")):
        return "dali"
    return "reference"


def resolve_decode(flag: str, device: torch.device) -> str:
    """--decode (FFCV): auto = nvJPEG on the device when it is a GPU, else in the loader."""
    if flag != "auto":
        return flag
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's cpuset), as
    torch's DataLoader counts them when it warns about too many workers."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(flag: int, local_world_size: int) -> int:
    """--num_workers: -1 = this machine's usable CPU cores shared by its processes (1 to 16)."""
    if flag >= 0:
        return flag
    return max(1, min(16, usable_cores() // local_world_size))


def resolve_sync_bn(flag: str, device: torch.device, world_size: int) -> bool:
    """--sync_bn: auto = on under DDP with CUDA (as the reference), off on the CPU (gloo)."""
    if world_size == 1 or flag == "off":
        return False
    if flag == "on" and torch.device(device).type != "cuda":
        raise UnavailableError("--sync_bn=on needs CUDA: torch's SyncBatchNorm has no CPU "
                               "kernel")
    return torch.device(device).type == "cuda"
