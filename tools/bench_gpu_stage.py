"""Time, or counted cost, of the GPU multi-crop stage (pipelines/stage/torch_spec.py) on
synthetic images.

    python tools/bench_gpu_stage.py --device=cuda --batch_size=256 --impl=triton
    python tools/bench_gpu_stage.py --device=cuda --batch_size=256 --decode=gpu
    python tools/bench_gpu_stage.py --count --device=cpu --batch_size=4 --impl=triton

--count (any device, no GPU needed; Triton in its interpreter off CUDA): the device side of one
batch (decode hand-off plus the stage) under trex_fast.measure.costcount, after one warm-up batch:
bytes of every aten op's tensors plus every Triton launch's tensor arguments, launches, host
syncs, float64 tensors over 64k elements, and the bytes the batch moves host-to-device; one
JSON line with the counts for the batch and scaled to a batch of 256. A count is a cost model
(DESIGN.md "Performance targets"), not a timing.

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

from pipelines.spec import multicrop_spec  # noqa: E402
from pipelines.stage.dispatch import GpuMultiCrop  # noqa: E402
from pipelines.stage.gpu_decode import decode_canvas, decode_images  # noqa: E402
from pipelines.stage.handoff import from_packed  # noqa: E402
from trex_fast.availability import kernel_impl  # noqa: E402
from trex_fast.cli import run_cli  # noqa: E402
from trex_fast.config import make_config  # noqa: E402
from trex_fast.measure.costcount import count_cost  # noqa: E402
from trex_fast.measure.profiling import timed  # noqa: E402


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


def _count(one, batch_size: int, h2d_bytes: int, impl: str) -> dict:
    """Counted cost of one batch (one warm-up first, so per-device caches exist)."""
    with count_cost(run_kernels=False):
        one(0)
    with count_cost(run_kernels=False) as cost:
        one(1)
    scale = 256 / batch_size
    return {"counted": f"batch {batch_size}, scaled x{scale:g} to 256",
            **{f"{k}_per_256": v for k, v in cost.summary(scale).items()},
            "h2d_gb_per_256": round(h2d_bytes * scale / 1e9, 3),
            "launches": cost.launches, "host_sync_ops": sorted(set(cost.host_syncs)),
            "triton_kernels": sorted({name for name, _ in cost.triton_launches}),
            "float64_max_numel": max(cost.float64_tensors, default=0), "impl": impl}


def main(batch_size: int = 256, max_resolution: int = 500, preset: str = "trex",
         device: str = "cuda", steps: int = 10, warmup: int = 3, seed: int = 0,
         decode: str = "none", impl: str = "auto", count: bool = False) -> None:
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
        impl: the stage's implementation: auto (triton on CUDA, torch elsewhere), torch or
            triton (off CUDA: Triton's interpreter, TRITON_INTERPRET=1).
        count: count the device side's cost (bytes, launches, host syncs, float64 tensors)
            instead of timing it; works without a GPU.
    """
    if count and impl == "triton" and device != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    if decode not in ("none", "gpu"):
        raise SystemExit(f"--decode={decode!r}: expected none or gpu")
    cfg = make_config(preset, batch_size=batch_size)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(max_resolution // 2, max_resolution + 1, (batch_size, 2), generator=gen)
    labels = torch.randint(0, 1000, (batch_size,), generator=gen)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dtype = torch.bfloat16 if count else dtype  # counts are for the production dtype
    if impl == "auto":
        impl = kernel_impl(dev)  # as the run plan resolves it
    stage = GpuMultiCrop(multicrop_spec(cfg), dev, dtype, channels_last=True, seed=seed,
                         impl=impl)
    extra = {}
    if decode == "gpu":
        stored, info = _jpeg_batch(sizes, gen)

        def images_of(step: int):
            return decode_images(stored, info, max_resolution, max_resolution, dev)
        h2d_bytes = int(info[:, 2].sum())  # the JPEG bytes nvJPEG reads
    else:
        packed = torch.randint(0, 256, (batch_size, max_resolution * max_resolution * 3),
                               dtype=torch.uint8, generator=gen).to(dev)
        h2d_bytes = packed.numel()  # the loader's slots, if copied as they are

        def images_of(step: int):  # the host-to-device copy is counted, not timed
            return from_packed(packed, sizes, max_resolution, max_resolution)
    out = {}

    def one(step: int):
        out["batch"] = stage(images_of(step), None, labels, epoch=0, step=step)

    if count:
        print(json.dumps({"bench": "gpu_stage_count", "device": str(dev),
                          "batch_size": batch_size, "max_resolution": max_resolution,
                          "crops": f"{cfg.global_crops}x{cfg.global_size}+"
                                   f"{cfg.local_crops}x{cfg.local_size}",
                          "decode": decode, "dtype": "bf16",
                          **_count(one, batch_size, h2d_bytes, stage.impl)}), flush=True)
        return
    if decode == "gpu":
        decode_s = _per_call(images_of, steps, warmup, dev)
        on_device, on_cpu = images_of(0).to_canvas().cpu().int(), decode_canvas(
            stored, info, max_resolution, max_resolution, "cpu").int()
        inside = torch.cat([(on_device[i, :h, :w] - on_cpu[i, :h, :w]).abs().flatten()
                            for i, (h, w) in enumerate(sizes.tolist())]).float()
        extra = {"decode_ms_per_batch": round(1000 * decode_s, 3),
                 "decode_images_per_s": round(batch_size / decode_s, 1),
                 "jpeg_kib_mean": round(info[:, 2].float().mean().item() / 1024, 1),
                 "vs_cpu_decode_mean_abs": round(inside.mean().item(), 4),
                 "vs_cpu_decode_max_abs": int(inside.max().item())}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = _per_call(one, steps, warmup, dev)
    batch = out["batch"]
    result = {
        "bench": "gpu_stage", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": batch_size, "max_resolution": max_resolution,
        "crops": f"{cfg.global_crops}x{cfg.global_size}+{cfg.local_crops}x{cfg.local_size}",
        "decode": decode, "impl": stage.impl,
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
