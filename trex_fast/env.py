"""What this machine can use, and why: `python -m trex_fast.env`.

One line per back-end, from the probes in trex_fast/availability.py that the loaders and the
test markers ask (CUDA and its device, bf16, ffcv, DALI in CPU and GPU mode, Triton, nvJPEG
through torchvision), then what the "auto" flags resolve to here, through the functions the
training run calls. Exit code 0 whatever is missing: it describes, it does not judge.
"""
from __future__ import annotations

import platform
import sys

import torch

from trex_fast import availability


def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("torchvision", "triton", "numba", "ffcv"):
        dist = availability._dist_version(name)
        parts.append(f"{name} {dist[1] if dist else 'absent'}")
    return ", ".join(parts)


def auto_choices() -> str:
    """device, precision, loss_impl and the multi-crop stage as a run with the default flags
    resolves them."""
    from trex_fast.config import make_config

    cfg = make_config()
    device = availability.resolve_device(cfg.device)
    return (f"device={device} precision={availability.resolve_precision(cfg.precision, device)} "
            f"loss_impl={availability.resolve_loss_impl(cfg.loss_impl, device)} "
            f"stage_impl={availability.kernel_impl(device)}")


def report() -> list[str]:
    lines = [versions()]
    for probe in availability.PROBES:
        p = probe()
        lines.append(f"{p.name:<9} {'yes' if p.ok else 'no ':<4} {p.why}")
    lines.append(f"auto      {auto_choices()}")
    return lines


def main() -> None:
    sys.stdout.write("\n".join(report()) + "\n")


if __name__ == "__main__":
    main()
