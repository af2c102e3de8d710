"""Is training data-bound or compute-bound? (issue #7)

Three measurements over the same number of steps, each after a warm-up:
  real       the pipeline feeding train_step (what a run does);
  synthetic  train_step on one batch already on the device (the compute ceiling);
  loader     the pipeline alone, batches delivered on the device (the data ceiling).
real / synthetic >= 0.95 means the pipeline keeps up (compute-bound); below it the verdict
names the pipeline as the bottleneck and the likely remedy.
"""
from __future__ import annotations

import itertools
import time

import torch

from pipelines.batch import MultiCropBatch
from trex_fast.step import TrainState, train_step

KEEPS_UP = 0.95  # DESIGN.md: the real pipeline within 5% of synthetic data

REMEDIES = {
    "reference": "the PIL pipeline is the baseline, not a fast path: convert the data with "
                 "tools/convert_in1k.py and use --pipeline=ffcv (or dali)",
    "ffcv": "more --num_workers, a lower max_resolution or raw images at conversion time, or "
            "--pipeline=dali (GPU decode)",
    "dali": "more CPU threads (--num_workers) or GPU decoding (device 'mixed' needs CUDA)",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(device: torch.device, steps: int, batch_size: int, run) -> float:
    """samples/s of run(), which does `steps` steps, measured between two syncs."""
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def synthetic_batch(cfg, num_classes: int, device: torch.device,
                    dtype: torch.dtype) -> MultiCropBatch:
    """A batch of the contract's shapes (random normalised-looking crops) on the device."""
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    b = cfg.batch_size

    def crops(n: int, size: int) -> torch.Tensor:
        x = torch.randn(n * b, 3, size, size, device=device, dtype=dtype)
        return x.contiguous(memory_format=fmt)

    return MultiCropBatch(crops(cfg.global_crops, cfg.global_size),
                          crops(cfg.local_crops, cfg.local_size),
                          torch.randint(0, num_classes, (b,), device=device))


def measure(state: TrainState, train_data, pipeline: str, steps: int, warmup: int) -> dict:
    """The report; trains about `2 * (warmup + steps)` steps on `state` (a throw-away state).

    Synthetic data is timed first, before any loader thread or worker exists, so that the
    compute ceiling is not slowed by a loader winding down."""
    needed = warmup + steps
    if needed > train_data.steps_per_epoch:
        raise ValueError(f"profiling needs {needed} steps but an epoch has only "
                         f"{train_data.steps_per_epoch}; lower the steps or the batch size")
    device, batch_size = state.device, state.cfg.batch_size
    fake = synthetic_batch(state.cfg, state.plan.num_classes, device, state.plan.dtype)

    def timed(fn) -> float:
        return _rate(device, steps, batch_size, fn)

    for _ in range(warmup):
        train_step(state, fake)
    result = {"pipeline": pipeline, "steps": steps, "batch_size": batch_size,
              "synthetic_samples_per_s": timed(lambda: [train_step(state, fake)
                                                        for _ in range(steps)])}
    batches = train_data.epoch(0)
    try:
        for batch in itertools.islice(batches, warmup):
            train_step(state, batch)
        result["real_samples_per_s"] = timed(lambda: [train_step(state, b) for b in
                                                      itertools.islice(batches, steps)])
    finally:
        batches.close()  # a loader left mid-epoch must be closed (FFCV aborts otherwise)
    batches = train_data.epoch(1)
    try:
        for _ in itertools.islice(batches, warmup):
            pass
        # .labels.sum(): touch each batch on the device
        result["loader_samples_per_s"] = timed(lambda: [b.labels.sum() for b in
                                                        itertools.islice(batches, steps)])
    finally:
        batches.close()
    ratio = result["real_samples_per_s"] / result["synthetic_samples_per_s"]
    result["real_over_synthetic"] = round(ratio, 3)
    if ratio >= KEEPS_UP:
        result["verdict"] = (f"compute-bound: the {pipeline} pipeline keeps up (real data at "
                             f"{100 * ratio:.0f}% of synthetic)")
    else:
        result["verdict"] = (f"data-bound: real data runs at {100 * ratio:.0f}% of synthetic; "
                             f"remedy: {REMEDIES.get(pipeline, 'a faster pipeline')}")
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
