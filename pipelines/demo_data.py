"""The built-in demo dataset: a small ImageNet-layout folder of real JPEGs, made once.

Each class is a texture family (stripes, checkers, rings, ...) with a class-typical hue; every
image draws its own period, phase, contrast, colour, noise and size. The cue survives the
recipe's crops, flips, colour jitter and grayscale, so a small network learns it from 32-px
local crops on a CPU in minutes, while chance stays at 1 / num_classes.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from pipelines import atomic

VERSION = 1
PATTERNS = ("h_stripes", "v_stripes", "checkers", "crosshatch", "dots", "rings", "blobs",
            "speckle")
TRAIN_PER_CLASS = 120
VAL_PER_CLASS = 30


def default_cache_dir() -> str:
    base = os.environ.get("TREX_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(base, "trex_fast", f"demo_v{VERSION}")


def _texture(pattern: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A [h, w] float texture in [-1, 1] of one pattern family."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(7, 14)
    k = 2 * np.pi / period
    phase = rng.uniform(0, 2 * np.pi, size=2)
    if pattern == "h_stripes":
        t = np.sin(k * y + phase[0])
    elif pattern == "v_stripes":
        t = np.sin(k * x + phase[0])
    elif pattern == "checkers":
        t = np.sign(np.sin(k * x + phase[0]) * np.sin(k * y + phase[1]))
    elif pattern == "crosshatch":  # both diagonals: unchanged by a horizontal flip
        t = np.maximum(np.sin(k * (x + y) / 1.4 + phase[0]), np.sin(k * (x - y) / 1.4 + phase[1]))
    elif pattern == "dots":
        t = (np.sin(k * x + phase[0]) * np.sin(k * y + phase[1]) > 0.6) * 2.0 - 1
    elif pattern == "rings":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.sin(k * np.hypot(y - cy, x - cx) + phase[0])
    elif pattern == "blobs":  # low-frequency noise, upsampled
        small = rng.standard_normal((h // 16 + 2, w // 16 + 2)).astype(np.float32)
        t = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
        t = np.tanh(t)
    else:  # speckle: pixel noise, the only class without structure at the crop scale
        t = rng.uniform(-1, 1, size=(h, w)).astype(np.float32)
    return t.astype(np.float32)


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    h, w = int(rng.integers(84, 120)), int(rng.integers(112, 160))
    texture = _texture(PATTERNS[label], h, w, rng)  # [h, w]
    hue = (label / len(PATTERNS) + rng.normal(0, 0.04)) % 1.0
    colour = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 180, 200)).convert("RGB")
                      .getpixel((0, 0)), dtype=np.float32)  # [3]
    contrast = rng.uniform(50, 90)
    pixels = colour[None, None, :] + contrast * texture[..., None]  # [h, w, 3]
    pixels += rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_dataset(root: str, train_per_class: int = TRAIN_PER_CLASS,
                  val_per_class: int = VAL_PER_CLASS, seed: int = 0) -> None:
    """Write root/{train,val}/<class>/*.JPEG (quality 90)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(PATTERNS):
            folder = os.path.join(root, split, f"c{label:02d}_{name}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                make_image(label, rng).save(os.path.join(folder, f"{name}_{i:04d}.JPEG"),
                                            quality=90)


def ensure_demo_dataset(cache_dir: str | None = None) -> str:
    """The demo dataset's root, written once (atomically: a temp dir renamed into place)."""
    root = cache_dir or default_cache_dir()
    if os.path.isdir(os.path.join(root, "val")):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo_tmp_", dir=parent)
    try:
        print(f"[trex_fast] writing the demo dataset once to {root}")
        write_dataset(tmp)
        atomic.fsync_tree(tmp)  # every image on disk before the tree gets its final name
        atomic.replace_durably(tmp, root)
    except OSError:
        if not os.path.isdir(os.path.join(root, "val")):  # not a lost race with another rank
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
