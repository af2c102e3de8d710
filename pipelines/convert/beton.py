"""A single-process, byte-deterministic writer of FFCV .beton files (RGBImageField + IntField).

Why not ffcv.writer.DatasetWriter: its RGBImageField.encode re-encodes every image itself (so
the FFCV pixels would differ from the DALI shards' and each image would be encoded twice), and
with several workers the order of its pages depends on process timing. Here the bytes are already
final, so writing is a sequential copy. The layout is FFCV 1.0.2's (ffcv/types.py, writer.py):
header | field descriptors | per-sample metadata | zero padding to a page | pages | alloc table.
As in FFCV, a sample never straddles a page and every page is written at full size.

The dtypes are restated here so that converting needs neither ffcv nor its 7 s import (numba);
tests check them against ffcv's own and read the result back with ffcv's Reader and Loader.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipelines.errors import BadFileError

from .images import Encoded

FFCV_VERSION = 2  # ffcv.types.CURRENT_VERSION
FFCV_MIN_PAGE_SIZE = 8 << 20  # DatasetWriter's default (4 x 2 MiB hugepages)
FIELD_NAMES = ("image", "label")  # the names ffcv-imagenet's loaders expect
FIELD_TYPE_IDS = (2, 1)  # ffcv.types.TYPE_ID_HANDLER: RGBImageField, IntField
JPG_MODE, RAW_MODE = 0, 1  # ffcv.fields.rgb_image.IMAGE_MODES

HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)),
                            ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
IMAGE_META_TYPE = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"),
                            ("data_ptr", "<u8")])
# One record per sample, the fields unnamed as in ffcv.types.get_metadata_type (numpy: f0, f1).
METADATA_TYPE = np.dtype([("", IMAGE_META_TYPE), ("", "<i8")], align=True)


def page_size_for(largest_sample: int) -> int:
    """Smallest power of two >= the largest sample, and at least FFCV's default page."""
    size = FFCV_MIN_PAGE_SIZE
    while size < largest_sample:
        size *= 2
    return size


def _align(offset: int, page_size: int) -> int:
    return -(-offset // page_size) * page_size


def _head_bytes(num_samples: int) -> int:
    """Header, field descriptors and per-sample metadata (before the padding to a page)."""
    return (HEADER_TYPE.itemsize + len(FIELD_NAMES) * FIELD_DESC_TYPE.itemsize
            + num_samples * METADATA_TYPE.itemsize)


def beton_size(num_samples: int, mean_sample: float, page_size: int) -> int:
    """The size of a .beton of `num_samples` samples of `mean_sample` bytes on average, as
    write_beton lays it out: the head padded to a page, whole pages (a sample that does not fit
    starts a new page, so a page loses up to one sample: counted as one mean sample), and the
    allocation table. A small split still takes two full pages (16 MiB at the default)."""
    mean_sample = min(max(mean_sample, 1.0), page_size / 2)
    pages = max(1, -(-int(num_samples * mean_sample) // int(page_size - mean_sample)))
    return (_align(_head_bytes(num_samples), page_size) + pages * page_size
            + num_samples * ALLOC_TABLE_TYPE.itemsize)


def _header_parts(num_samples: int, page_size: int):
    header = np.zeros(1, dtype=HEADER_TYPE)
    header["version"] = FFCV_VERSION
    header["num_fields"] = len(FIELD_NAMES)
    header["page_size"] = page_size
    header["num_samples"] = num_samples
    descriptors = np.zeros(len(FIELD_NAMES), dtype=FIELD_DESC_TYPE)  # both fields: no arguments
    for desc, name, type_id in zip(descriptors, FIELD_NAMES, FIELD_TYPE_IDS, strict=True):
        desc["type_id"] = type_id
        desc["name"][: len(name)] = np.frombuffer(name.encode("ascii"), dtype="<u1")
    return header, descriptors, np.zeros(num_samples, dtype=METADATA_TYPE)


def write_beton(path: Path, samples: Iterable[tuple[int, Encoded]], num_samples: int,
                page_size: int, progress=None) -> None:
    """Write `num_samples` (label, Encoded) pairs to `path` (the caller renames it into place)."""
    header, descriptors, metadata = _header_parts(num_samples, page_size)
    image_meta, labels = metadata["f0"], metadata["f1"]  # numpy names the unnamed fields f0, f1
    data_start = _align(_head_bytes(num_samples), page_size)
    allocations = []
    page, used, page_index = bytearray(page_size), 0, -1
    with open(path, "wb") as f:
        f.write(bytes(data_start))  # header, descriptors and metadata are filled in at the end
        count = 0
        for count, (label, enc) in enumerate(samples, start=1):
            data = enc.ffcv_bytes
            if page_index < 0 or used + len(data) > page_size:
                if page_index >= 0:
                    f.write(page)
                page, used, page_index = bytearray(page_size), 0, page_index + 1
            ptr = data_start + page_index * page_size + used
            page[used:used + len(data)] = data
            used += len(data)
            image_meta[count - 1] = (RAW_MODE if enc.raw is not None else JPG_MODE,
                                     enc.width, enc.height, ptr)
            labels[count - 1] = label
            allocations.append((count - 1, ptr, len(data)))
            if progress is not None:
                progress.update(1)
        if count != num_samples:
            raise RuntimeError(f"{path}: expected {num_samples} samples, got {count}")
        if page_index >= 0:
            f.write(page)
        header["alloc_table_ptr"] = f.tell()
        f.write(np.array(allocations, dtype=ALLOC_TABLE_TYPE).tobytes())
        f.seek(0)
        f.write(header.tobytes() + descriptors.tobytes() + metadata.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _read_at(f, offset: int, dtype: np.dtype, count: int = 1) -> np.ndarray:
    f.seek(offset)
    return np.frombuffer(f.read(dtype.itemsize * count), dtype=dtype)


def check_beton(path: str) -> None:
    """Raise BadFileError naming `path` when it is not a whole FFCV .beton: a header of another
    format, or a file shorter than its header says (the allocation table, which FFCV reads
    at the end, missing or cut, or a sample pointing past the data)."""
    size = os.path.getsize(path)
    if size < HEADER_TYPE.itemsize:
        raise BadFileError(f"{path}: truncated or not a .beton ({size} bytes, shorter than the "
                           "FFCV header)")
    with open(path, "rb") as f:
        header = _read_at(f, 0, HEADER_TYPE)[0]
        if int(header["version"]) != FFCV_VERSION or int(header["page_size"]) <= 0:
            raise BadFileError(f"{path}: not an FFCV .beton (version {int(header['version'])}, "
                               f"page size {int(header['page_size'])})")
        table_at, entry = int(header["alloc_table_ptr"]), ALLOC_TABLE_TYPE.itemsize
        if table_at > size or (size - table_at) % entry:
            raise BadFileError(f"{path}: truncated: {size} bytes, but its header puts the "
                               f"allocation table at byte {table_at} (a whole file ends on a "
                               f"{entry}-byte table entry after it); rerun tools/convert_in1k.py")
        table = _read_at(f, table_at, ALLOC_TABLE_TYPE, (size - table_at) // entry)
        types = _read_at(f, HEADER_TYPE.itemsize, FIELD_DESC_TYPE, int(header["num_fields"]))
    has_image = FIELD_TYPE_IDS[0] in types["type_id"]  # each sample's image is one allocation
    if (has_image and len(table) < int(header["num_samples"])) or (
            len(table) and int((table["ptr"] + table["size"]).max()) > table_at):
        raise BadFileError(f"{path}: truncated or damaged: its allocation table holds "
                           f"{len(table)} entries, pointing up to byte "
                           f"{int((table['ptr'] + table['size']).max(initial=0))} of {table_at}, "
                           f"for {int(header['num_samples'])} samples; rerun "
                           "tools/convert_in1k.py")
