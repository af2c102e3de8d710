"""Conversion throughput on an ImageNet-like synthetic set, and a projection for full IN1K.

    python tools/bench_convert.py --num_images=2000 --workers=1,2

The set (cached under --out) mimics ImageNet's train JPEGs: quality 90, natural-image-like
content (1/f amplitude spectrum, ~110 kB at 500x375), 75% with a 500 px longer side, 20% smaller
(250-499 px), 5% larger (600-1600 px). Each worker count converts it from scratch (both
formats, default options); the encode phase (decode, repair, resize, re-encode, persist) runs
on all workers, the write phase (.beton + tar shards from the work files, one thread each) does
not scale with cores. The IN1K projection uses CPU seconds per image (robust to other load).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import cv2
import fire
import numpy as np
from PIL import Image

from pipelines.convert.convert import convert
from pipelines.convert.options import make_options

IN1K_IMAGES = 1_281_167 + 50_000  # train + val


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random RGB field with a 1/f amplitude spectrum, the statistics of photographs."""
    h, w = min(height, 512), min(width, 512)  # larger images: upsample (photos are smooth too)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    channels = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random(amplitude.shape))
        field = np.fft.irfft2(amplitude * phase, s=(h, w))
        channels.append((field - field.mean()) / field.std())
    mix = rng.normal(size=(3, 3)) * 0.5 + np.eye(3)  # correlated colour channels
    img = np.tensordot(np.stack(channels, -1), mix, axes=1) * 30 + rng.uniform(80, 170, 3)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC) if h < height else img


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    roll = rng.random()
    longer = 500 if roll < 0.75 else int(rng.integers(250, 500) if roll < 0.95 else
                                         rng.integers(600, 1601))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 5 / 4])
    shorter = max(1, round(longer / aspect))
    return (longer, shorter) if rng.random() < 0.75 else (shorter, longer)  # (width, height)


def make_set(root: Path, num_images: int, num_classes: int, seed: int = 0) -> dict:
    """Write root/train/<class>/*.JPEG and root/val/<class>/*.JPEG once; return its statistics."""
    stats_file = root / "stats.json"
    wanted = {"num_images": num_images, "num_classes": num_classes, "seed": seed}
    if stats_file.is_file() and json.loads(stats_file.read_text())["params"] == wanted:
        return json.loads(stats_file.read_text())
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    total_bytes = total_pixels = 0
    for i in range(num_images):
        split = "val" if i % 25 == 0 else "train"  # IN1K's val:train ratio is 1:25.6
        folder = root / split / f"n{i % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = _image_size(rng)
        buf = io.BytesIO()
        Image.fromarray(natural_image(rng, height, width)).save(buf, "JPEG", quality=90)
        (folder / f"img_{i:07d}.JPEG").write_bytes(buf.getvalue())
        total_bytes += buf.tell()
        total_pixels += width * height
    stats = {"params": wanted, "mean_kb": total_bytes / num_images / 1e3,
             "mean_megapixels": total_pixels / num_images / 1e6}
    stats_file.write_text(json.dumps(stats))
    return stats


def _timed_run(src: Path, dst: Path, workers: int, formats: str) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    timings: dict = {}
    opts = make_options(src=str(src), dst=str(dst), num_workers=workers, formats=formats)
    with contextlib.redirect_stdout(io.StringIO()):
        meta = convert(opts, timings)
    out_bytes = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    shutil.rmtree(dst)
    return {**timings, "images": sum(meta["counts"].values()), "out_bytes": out_bytes}


def main(out: str = "bench_out/convert", num_images: int = 2000, num_classes: int = 20,
         workers: str | int | tuple = "1,2", target_cores: int = 16,
         formats: str = "ffcv,dali") -> None:
    """Benchmark the converter.

    Args:
        out: folder for the cached source set and the (deleted) outputs.
        num_images: images in the synthetic set (1 in 25 goes to val).
        num_classes: class folders.
        workers: comma-separated worker counts to measure.
        target_cores: core count of the machine the IN1K projection is for.
        formats: formats written, as --formats of convert_in1k.
    """
    # fire hands "--workers=1,2" over as a tuple and "--workers=2" as an int.
    counts = [int(w) for w in (workers if isinstance(workers, tuple) else
                               str(workers).split(","))]
    src = Path(out) / "src"
    stats = make_set(src, num_images, num_classes)
    print(f"set: {num_images} JPEGs q90, mean {stats['mean_kb']:.0f} kB, "
          f"{stats['mean_megapixels']:.3f} MP; formats {formats}; max_resolution 500")
    load_before = os.getloadavg()[0]  # other work on the machine skews the wall-clock rates
    runs = {w: _timed_run(src, Path(out) / "dst", w, formats) for w in counts}
    for w, r in runs.items():
        total_s = r["encode_s"] + r["write_s"]
        print(f"workers={w}: encode {r['encoded'] / r['encode_s']:7.1f} img/s wall "
              f"({r['encode_s']:.1f} s; {r['encoded'] / r['encode_cpu_s']:.0f} img per CPU-s), "
              f"write {r['images'] / r['write_s']:6.0f} img/s ({r['write_s']:.2f} s), "
              f"end to end {r['images'] / total_s:.1f} img/s; "
              f"outputs {r['out_bytes'] / r['images'] / 1e3:.0f} kB/img")
    print(f"1-min load average before the runs: {load_before:.2f} on {os.cpu_count()} cores")
    _project(runs[max(counts)], target_cores, stats["mean_kb"])


def _project(run: dict, cores: int, source_kb: float) -> None:
    # CPU time per image rather than wall time: it does not depend on what else the machine
    # runs. Linear scaling assumes one worker per core at this per-core speed.
    per_core = run["encoded"] / run["encode_cpu_s"]
    encode_h = IN1K_IMAGES / (per_core * cores) / 3600
    write_h = IN1K_IMAGES / (run["images"] / run["write_s"]) / 3600
    out_gb = run["out_bytes"] / run["images"] * IN1K_IMAGES / 1e9
    print(f"projection, full IN1K ({IN1K_IMAGES:,} images) on {cores} cores: encode "
          f"{encode_h:.2f} h ({per_core:.0f} img/s per core x {cores}) + write {write_h:.2f} h "
          f"(does not scale with cores; at the write rate measured here) = "
          f"{encode_h + write_h:.2f} h; outputs ~{out_gb:.0f} GB. Assumes storage that keeps up: "
          f"{per_core * cores * source_kb / 1e6:.1f} GB/s of source reads while encoding")


if __name__ == "__main__":
    fire.Fire(main)
