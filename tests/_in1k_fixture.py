"""A tiny ImageNet-layout tree with every kind of bad file the converter must survive.

Good images are smooth random fields (JPEG-friendly, like photographs) of 64-200 px. The bad
files all sit in the first class folder of train/ so that a --classes file without that class
selects a clean tree. `BAD_FILES` maps each bad file name to the issue kinds it must produce.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")  # the first three ImageNet classes
HUGE_SIZE = (6000, 4500)  # 27 MP, above issues.HUGE_PIXELS

BAD_FILES: dict[str, tuple[str, ...]] = {
    "bad_cmyk.JPEG": ("cmyk",),
    "bad_gray.JPEG": ("grayscale",),
    "bad_png.JPEG": ("wrong_extension",),
    "bad_rgba.JPEG": ("wrong_extension", "alpha"),
    "bad_png16gray.JPEG": ("wrong_extension", "16bit"),
    "bad_png48.JPEG": ("wrong_extension", "16bit"),
    "bad_palette.JPEG": ("wrong_extension", "palette"),
    "bad_exif.JPEG": ("exif_rotated",),
    "bad_truncated.JPEG": ("truncated",),
    "bad_empty.JPEG": ("empty",),
    "bad_text.JPEG": ("not_image",),
    "bad_noperm.JPEG": ("unreadable",),
    "bad_tiny.JPEG": ("tiny",),
    "bad_huge.JPEG": ("huge",),
    "notes.txt": ("ignored_extension",),
}
SKIPPED = {"bad_truncated.JPEG", "bad_empty.JPEG", "bad_text.JPEG", "bad_noperm.JPEG",
           "notes.txt"}


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random low-frequency RGB field: compresses like a photo, so JPEG error stays small."""
    coarse = rng.uniform(20, 235, size=(max(2, height // 24), max(2, width // 24), 3))
    img = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 95, **save_kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=quality, **save_kw)
    return out.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _bad_file_bytes(rng: np.random.Generator) -> dict[str, bytes]:
    base = smooth_image(rng, 90, 120)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    gray16 = base[:, :, 1].astype(np.uint16) * 257  # the channel bad_gray holds, in 16 bits
    full = jpeg_bytes(smooth_image(rng, 150, 180))
    huge = cv2.resize(smooth_image(rng, 45, 60), HUGE_SIZE, interpolation=cv2.INTER_LINEAR)
    cmyk = io.BytesIO()
    Image.fromarray(base).convert("CMYK").save(cmyk, "JPEG", quality=95)
    return {
        "bad_cmyk.JPEG": cmyk.getvalue(),
        "bad_gray.JPEG": jpeg_bytes(base[:, :, 1]),
        "bad_png.JPEG": _png_bytes(Image.fromarray(base)),
        "bad_rgba.JPEG": _png_bytes(Image.fromarray(base).convert("RGBA")),
        "bad_png16gray.JPEG": _png_bytes(Image.fromarray(gray16)),
        "bad_png48.JPEG": cv2.imencode(".png", base[:, :, ::-1].astype(np.uint16) * 257)[1]
        .tobytes(),
        "bad_palette.JPEG": _png_bytes(Image.fromarray(base).quantize(64)),
        "bad_exif.JPEG": jpeg_bytes(base, exif=exif.tobytes()),
        "bad_truncated.JPEG": full[: len(full) // 2],
        "bad_empty.JPEG": b"",
        "bad_text.JPEG": b"this is an HTML error page, not an image\n",
        "bad_noperm.JPEG": jpeg_bytes(base),
        "bad_tiny.JPEG": jpeg_bytes(np.full((6, 8, 3), (200, 40, 90), np.uint8)),
        "bad_huge.JPEG": jpeg_bytes(huge, quality=85),
        "notes.txt": b"not an image extension\n",
    }


def make_tree(root: Path, per_class: int = 5, val_per_class: int = 2, bad: bool = True,
              seed: int = 0) -> Path:
    """root/train/<wnid>/*.JPEG (+ bad files in the first class) and root/val/<wnid>/*.JPEG."""
    rng = np.random.default_rng(seed)
    val_id = 0
    for wnid in WNIDS:
        train_dir, val_dir = root / "train" / wnid, root / "val" / wnid
        train_dir.mkdir(parents=True)
        val_dir.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(64, 201, size=2)
            (train_dir / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(smooth_image(rng, h, w)))
        for _ in range(val_per_class):
            val_id += 1
            h, w = rng.integers(64, 201, size=2)
            (val_dir / f"ILSVRC2012_val_{val_id:08d}.JPEG").write_bytes(
                jpeg_bytes(smooth_image(rng, h, w)))
    if bad:
        first = root / "train" / WNIDS[0]
        for name, data in _bad_file_bytes(rng).items():
            (first / name).write_bytes(data)
        os.chmod(first / "bad_noperm.JPEG", 0)
    return root


def make_flat_val(tree: Path, out: Path) -> tuple[Path, Path]:
    """The same val images as one flat folder plus a LOC_val_solution.csv; train/ is linked."""
    (out / "val").mkdir(parents=True)
    os.symlink(tree / "train", out / "train")
    rows = ["ImageId,PredictionString"]
    for class_dir in sorted((tree / "val").iterdir()):
        for img in sorted(class_dir.iterdir()):
            (out / "val" / img.name).write_bytes(img.read_bytes())
            rows.append(f"{img.stem},{class_dir.name} 1 2 30 40 {class_dir.name} 5 6 70 80")
    csv_path = out / "LOC_val_solution.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return out, csv_path
