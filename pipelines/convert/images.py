"""Decode one source file once, repair it to RGB, resize, re-encode: the bytes both writers store.

`convert_file` never raises for a bad file: it returns (None, [the skip Issue]) or (Encoded,
[repair and note Issues]). Pillow decodes (it reports the true format, pixel mode and EXIF);
OpenCV's INTER_AREA resizes (what FFCV's own writer uses); Pillow's libjpeg-turbo re-encodes.
"""
from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .issues import HUGE_PIXELS, REPAIRED, TINY_SIDE, Issue

# Decoded pixels above this (after DCT scaling for JPEG) would need > 0.8 GB per worker.
MAX_DECODE_PIXELS = 1 << 28

# What ImageFolder's extensions promise, as Pillow names formats.
EXPECTED_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".pgm": "PPM",
                   ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}

# EXIF orientation tag value -> the Pillow transpose that makes the pixels upright.
ORIENTATION_FIX = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class EncodeSpec:
    max_resolution: int  # px, longer side
    jpeg_quality: int
    write_mode: str  # FFCV storage: jpg | raw | smart | proportion
    compress_probability: float
    smart_threshold: int | None
    seed: int
    want_ffcv: bool
    want_dali: bool
    keep_source: bool = False  # store the source's own JPEG bytes when it needs no repair


@dataclass(frozen=True)
class Encoded:
    width: int
    height: int
    jpeg: bytes | None  # set when DALI is wanted or FFCV stores this image as JPEG
    raw: bytes | None  # set when FFCV stores raw RGB, [height, width, 3] uint8, C order

    @property
    def ffcv_bytes(self) -> bytes:
        return self.raw if self.raw is not None else self.jpeg


class _Skip(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind)
        self.kind, self.detail = kind, detail


def configure_process() -> None:
    """Per-process settings for conversion workers (called once per worker)."""
    cv2.setNumThreads(1)  # parallelism is one image per process; threads would oversubscribe
    Image.MAX_IMAGE_PIXELS = None  # replaced by MAX_DECODE_PIXELS, applied after DCT scaling


def convert_file(path: str, rel: str, split: str, index: int,
                 spec: EncodeSpec) -> tuple[Encoded | None, list[Issue]]:
    """Decode, repair, resize and encode one file; `index` seeds its random storage choice."""
    issues: list[Issue] = []

    def note(kind: str, detail: str = "") -> None:
        if all(i.kind != kind for i in issues):  # one line per kind and file
            issues.append(Issue(split, rel, kind, detail))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's per-file warnings become Issues instead
            data = _read(path)
            rgb = _decode_rgb(data, PurePosixPath(rel).suffix, spec.max_resolution, note)
            fitted = fit_within(rgb, spec.max_resolution)
            kept = data if spec.keep_source and _as_is(data, fitted is rgb, issues) else None
            return _encode(fitted, spec, split, index, kept), issues
    except _Skip as skip:  # repairs noted before the failure no longer matter
        return None, [Issue(split, rel, skip.kind, skip.detail)]
    except Exception as e:  # one odd file (an exotic mode, a codec bug) must not stop the run
        return None, [Issue(split, rel, "decode_error", f"{type(e).__name__}: {e}")]


def _as_is(data: bytes, unresized: bool, issues: list[Issue]) -> bool:
    """Whether the source bytes are what the converter would otherwise have to make: a whole
    JPEG (start and end markers) that needed no resize and no repair (upright 8-bit RGB)."""
    whole_jpeg = data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"
    return whole_jpeg and unresized and all(i.action != REPAIRED for i in issues)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # PermissionError, EIO, a file that vanished since the scan
        raise _Skip("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    if not data:
        raise _Skip("empty")
    return data


def _decode_rgb(data: bytes, ext: str, max_res: int, note) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _Skip("not_image", f"first bytes {data[:8]!r}") from None
    except Exception as e:  # a header Pillow recognises but cannot parse
        raise _Skip("decode_error", f"{type(e).__name__}: {e}") from None
    if im.format != EXPECTED_FORMAT.get(ext.lower()):
        note("wrong_extension", f"{im.format} data in a {ext} file")
    width, height = im.size
    if width * height > HUGE_PIXELS:
        note("huge", f"{width}x{height}")
    if im.format == "JPEG":  # libjpeg decodes at 1/2, 1/4 or 1/8 scale if still >= the target
        im.draft(None, _scaled(width, height, max_res))
    if im.size[0] * im.size[1] > MAX_DECODE_PIXELS:
        raise _Skip("too_large", f"{width}x{height}")
    orientation = _orientation(im)
    _load(im)
    if im.format == "PNG" and data[24:25] == b"\x10":  # IHDR bit depth; Pillow keeps 8 bits
        note("16bit", f"16-bit {im.mode} PNG")
    rgb = _to_rgb(im, note)
    if orientation in ORIENTATION_FIX:
        note("exif_rotated", f"orientation {orientation}")
        rgb = np.asarray(Image.fromarray(rgb).transpose(ORIENTATION_FIX[orientation]))
    if min(rgb.shape[:2]) < TINY_SIDE:
        note("tiny", f"{rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a corrupt EXIF block must not lose an otherwise good image
        return 1


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except OSError as e:
        kind = "truncated" if "truncated" in str(e) else "decode_error"
        raise _Skip(kind, str(e)) from None
    except Exception as e:  # any decoder failure on one file must not stop the run
        raise _Skip("decode_error", f"{type(e).__name__}: {e}") from None


def _to_rgb(im: Image.Image, note) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer grayscale
        note("16bit", f"mode {mode}")
        gray = np.clip(np.asarray(im).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "CMYK":
        note("cmyk")
    elif mode in ("L", "1"):
        note("grayscale", f"mode {mode}")
    elif mode == "P":
        note("alpha" if "transparency" in im.info else "palette", "palette")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        note("alpha", f"mode {mode}")
    else:
        note("other_mode", f"mode {mode}")
    return np.asarray(im.convert("RGB"))


def _scaled(width: int, height: int, max_res: int) -> tuple[int, int]:
    scale = min(1.0, max_res / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_within(rgb: np.ndarray, max_res: int) -> np.ndarray:
    """Resize so the longer side is at most max_res (area interpolation, aspect kept)."""
    height, width = rgb.shape[:2]
    if max(width, height) <= max_res:
        return rgb
    size = _scaled(width, height, max_res)  # (width, height), as cv2 wants it
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _stores_raw(spec: EncodeSpec, raw_nbytes: int, split: str, index: int) -> bool:
    """FFCV's write_mode semantics, with the proportion draw seeded per (seed, split, index)."""
    if spec.write_mode == "smart":
        return raw_nbytes <= spec.smart_threshold
    if spec.write_mode == "proportion":
        seq = np.random.SeedSequence([spec.seed, zlib.crc32(split.encode()), index])
        return not np.random.default_rng(seq).random() < spec.compress_probability
    return spec.write_mode == "raw"


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _encode(rgb: np.ndarray, spec: EncodeSpec, split: str, index: int,
            source_jpeg: bytes | None = None) -> Encoded:
    """The stored forms of rgb; source_jpeg: the source's own bytes, stored instead of a
    re-encode (they decode to rgb)."""
    store_raw = spec.want_ffcv and _stores_raw(spec, rgb.nbytes, split, index)
    need_jpeg = spec.want_dali or (spec.want_ffcv and not store_raw)
    jpeg = (source_jpeg or encode_jpeg(rgb, spec.jpeg_quality)) if need_jpeg else None
    raw = np.ascontiguousarray(rgb).tobytes() if store_raw else None
    return Encoded(width=rgb.shape[1], height=rgb.shape[0], jpeg=jpeg, raw=raw)
