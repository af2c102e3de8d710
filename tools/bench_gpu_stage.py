"""Time of the GPU multi-crop stage (pipelines/gpu_multicrop.py) on synthetic images.

    python tools/bench_gpu_stage.py --device=cuda --batch_size=256
    python tools/bench_gpu_stage.py --device=cuda --batch_size=256 --decode=gpu

Needs neither FFCV nor DALI. --decode=none: packed decodes of random sizes up to max_resolution
(as the FFCV decoder hands them over) are unpacked, cropped, resized and augmented into the
t-ReX MultiCropBatch. --decode=gpu: the same sizes as JPEGs (smooth random images, quality 90,
encoded here by torchvision), stored as FFCV's decode="gpu" mode hands them over, and the timed
stage starts with the batched decode (pipelines/gpu_decode.decode_canvas: nvJPEG on CUDA); the
line adds the decode alone (ms and images/s) and its agreement with the CPU decoder (mean and
max |diff| of 255). CUDA events after a warm-up; one JSON line. Compare ms_per_batch with
bench_step's step_ms at the same batch size for the stage's share of a training step.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.gpu_decode import decode_canvas  # noqa: E402
from pipelines.gpu_multicrop import GpuMultiCrop, unpack_canvas  # noqa: E402
from pipelines.spec import multicrop_spec  # noqa: E402
from trex_fast.cli import run_cli  # noqa: E402
from trex_fast.config import make_config  # noqa: E402
from trex_fast.profiling import timed  # noqa: E402


def _jpeg_batch(sizes: torch.Tensor, gen: torch.Generator, quality: int = 90):
    """(stored [B, slot] uint8, info [B, 4]) as FFCV's BytesPassthrough + SampleInfoDecoder
    give them: each sample's JPEG bytes first in its row, info = (h, w, nbytes, is_jpeg)."""
    from torchvision.io import encode_jpeg
    jpegs = []
    for h, w in sizes.tolist():  # smooth images: noise at 1/16 scale, upsampled
        small = torch.rand(1, 3, max(1, h // 16), max(1, w // 16), generator=gen)
        image = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")
        jpegs.append(encode_jpeg((image[0] * 255).to(torch.uint8), quality=quality))
    stored = torch.zeros(len(jpegs), max(len(j) for j in jpegs), dtype=torch.uint8)
    info = torch.zeros(len(jpegs), 4, dtype=torch.int64)
    for i, (j, (h, w)) in enumerate(zip(jpegs, sizes.tolist())):
        stored[i, :len(j)] = j
        info[i] = torch.tensor([h, w, len(j), 1])
    return stored, info


def _per_call(fn, steps: int, warmup: int, dev: torch.device) -> float:
    """Seconds per call of fn(step) after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    return timed(dev, lambda: [fn(warmup + i) for i in range(steps)]) / steps


def main(batch_size: int = 256, max_resolution: int = 500, preset: str = "trex",
         device: str = "cuda", steps: int = 10, warmup: int = 3, seed: int = 0,
         decode: str = "none") -> None:
    """Benchmark the GPU multi-crop stage.

    Args:
        batch_size: images per batch.
        max_resolution: canvas side (the .beton's max_resolution).
        preset: recipe preset whose crops are made (trex: 1 x 224 + 8 x 96).
        device: cuda or cpu.
        steps: timed batches.
        warmup: untimed batches first.
        seed: seed of the synthetic images and of the augmentations.
        decode: none (decoded images in, as FFCV's CPU decode gives them) or gpu (JPEG bytes
            in, decoded in the stage, as FFCV's decode="gpu" mode).
    """
    if decode not in ("none", "gpu"):
        raise SystemExit(f"--decode={decode!r}: expected none or gpu")
    cfg = make_config(preset, batch_size=batch_size)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(max_resolution // 2, max_resolution + 1, (batch_size, 2), generator=gen)
    labels = torch.randint(0, 1000, (batch_size,), generator=gen)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    stage = GpuMultiCrop(multicrop_spec(cfg), dev, dtype, channels_last=True, seed=seed)
    extra = {}
    if decode == "gpu":
        stored, info = _jpeg_batch(sizes, gen)

        def canvas_of(step: int):
            return decode_canvas(stored, info, max_resolution, max_resolution, dev)
        decode_s = _per_call(canvas_of, steps, warmup, dev)
        on_device, on_cpu = canvas_of(0).cpu().int(), decode_canvas(
            stored, info, max_resolution, max_resolution, "cpu").int()
        inside = torch.cat([(on_device[i, :h, :w] - on_cpu[i, :h, :w]).abs().flatten()
                            for i, (h, w) in enumerate(sizes.tolist())]).float()
        extra = {"decode_ms_per_batch": round(1000 * decode_s, 3),
                 "decode_images_per_s": round(batch_size / decode_s, 1),
                 "jpeg_kib_mean": round(info[:, 2].float().mean().item() / 1024, 1),
                 "vs_cpu_decode_mean_abs": round(inside.mean().item(), 4),
                 "vs_cpu_decode_max_abs": int(inside.max().item())}
    else:
        packed = torch.randint(0, 256, (batch_size, max_resolution * max_resolution * 3),
                               dtype=torch.uint8, generator=gen).to(dev)

        def canvas_of(step: int):
            return unpack_canvas(packed, sizes, max_resolution, max_resolution)
    out = {}

    def one(step: int):
        out["batch"] = stage(canvas_of(step), sizes, labels, epoch=0, step=step)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = _per_call(one, steps, warmup, dev)
    batch = out["batch"]
    result = {
        "bench": "gpu_stage", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": batch_size, "max_resolution": max_resolution,
        "crops": f"{cfg.global_crops}x{cfg.global_size}+{cfg.local_crops}x{cfg.local_size}",
        "decode": decode,
        "ms_per_batch": round(1000 * seconds, 3),
        "images_per_s": round(batch_size / seconds, 1),
        "peak_mem_gib": (round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                         if dev.type == "cuda" else None),
        "out_shapes": [list(batch.global_crops.shape), list(batch.local_crops.shape)],
        **extra,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run_cli(main)
