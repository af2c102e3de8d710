"""Time of the GPU multi-crop stage (pipelines/gpu_multicrop.py) on synthetic decoded images.

    python tools/bench_gpu_stage.py --device=cuda --batch_size=256

Needs neither FFCV nor DALI: packed decodes of random sizes up to max_resolution (as the FFCV
decoder hands them over) are unpacked, cropped, resized and augmented into the t-ReX
MultiCropBatch. CUDA events after a warm-up; one JSON line. Compare its ms_per_batch with
bench_step's step_ms at the same batch size for the stage's share of a training step.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.gpu_multicrop import GpuMultiCrop, unpack_canvas  # noqa: E402
from pipelines.spec import multicrop_spec  # noqa: E402
from trex_fast.cli import run_cli  # noqa: E402
from trex_fast.config import make_config  # noqa: E402


def main(batch_size: int = 256, max_resolution: int = 500, preset: str = "trex",
         device: str = "cuda", steps: int = 10, warmup: int = 3, seed: int = 0) -> None:
    """Benchmark the GPU multi-crop stage.

    Args:
        batch_size: images per batch.
        max_resolution: canvas side (the .beton's max_resolution).
        preset: recipe preset whose crops are made (trex: 1 x 224 + 8 x 96).
        device: cuda or cpu.
        steps: timed batches.
        warmup: untimed batches first.
        seed: seed of the synthetic images and of the augmentations.
    """
    cfg = make_config(preset, batch_size=batch_size)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(max_resolution // 2, max_resolution + 1, (batch_size, 2), generator=gen)
    packed = torch.randint(0, 256, (batch_size, max_resolution * max_resolution * 3),
                           dtype=torch.uint8, generator=gen).to(dev)
    labels = torch.randint(0, 1000, (batch_size,), generator=gen)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    stage = GpuMultiCrop(multicrop_spec(cfg), dev, dtype, channels_last=True, seed=seed)

    def one(step: int):
        canvas = unpack_canvas(packed, sizes, max_resolution, max_resolution)
        return stage(canvas, sizes, labels, epoch=0, step=step)

    for i in range(warmup):
        one(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(steps):
        batch = one(warmup + i)
    if dev.type == "cuda":
        end.record()
        torch.cuda.synchronize(dev)
        seconds = start.elapsed_time(end) / 1000
    else:
        seconds = time.perf_counter() - t0
    result = {
        "bench": "gpu_stage", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": batch_size, "max_resolution": max_resolution,
        "crops": f"{cfg.global_crops}x{cfg.global_size}+{cfg.local_crops}x{cfg.local_size}",
        "ms_per_batch": round(1000 * seconds / steps, 3),
        "images_per_s": round(steps * batch_size / seconds, 1),
        "peak_mem_gib": (round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                         if dev.type == "cuda" else None),
        "out_shapes": [list(batch.global_crops.shape), list(batch.local_crops.shape)],
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run_cli(main)
