"""--verify: re-read the outputs and check them against a fresh scan of the source tree.

Expected per split: the scanned samples minus those meta.json lists as skipped, in order, with
their ImageFolder labels. Checked: the .beton through ffcv's own Reader (count, labels, sizes
within max_resolution, JPEG markers and header size, raw byte counts); every tar shard member
against its DALI index line, keys, .cls labels and JPEG headers; and, in jpg mode with both
formats, that sample i holds the same bytes in both. Images are not fully decoded (a JPEG that
starts with SOI, ends with EOI and has the recorded size in its header is taken as intact).
"""
from __future__ import annotations

import io
import mmap
import tarfile
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import numpy as np
from PIL import Image

from .beton import JPG_MODE
from .issues import SKIPPED
from .options import ConvertError, ConvertOptions
from .report import load_meta, output_paths
from .shards import INDEX_VERSION, sample_key, shard_name
from .sources import scan

MAX_REPORTED = 10  # problems listed per split and format before the rest are only counted


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._per_where: dict[str, int] = {}

    def add(self, where: str, text: str) -> None:
        n = self._per_where.get(where, 0) + 1
        self._per_where[where] = n
        if n <= MAX_REPORTED:
            self.lines.append(f"{where}: {text}")
        elif n == MAX_REPORTED + 1:
            self.lines.append(f"{where}: (further problems not listed)")


def verify(opts: ConvertOptions) -> list[str]:
    """Return the problems found (empty when the outputs match the source)."""
    dst = Path(opts.dst)
    if not (dst / "meta.json").is_file():
        raise ConvertError(f"--verify: {dst}/meta.json not found; the conversion is not complete")
    meta = load_meta(dst)
    plan = scan(opts)
    skipped = {(i["split"], i["path"]) for i in meta["issues"] if i["action"] == SKIPPED}
    problems = _Problems()
    for split, source in plan.splits.items():
        labels = [s.label for s in source.samples if (split, s.path) not in skipped]
        if len(labels) != meta["counts"].get(split):
            problems.add(split, f"source has {len(labels)} convertible files, meta.json counts "
                                f"{meta['counts'].get(split)}")
        _verify_split(dst, split, labels, opts, problems)
    return problems.lines


def _verify_split(dst: Path, split: str, labels: list[int], opts: ConvertOptions,
                  problems: _Problems) -> None:
    paths = output_paths(dst, split)
    streams = {}
    if "ffcv" in opts.formats:
        streams["ffcv"] = _beton_samples(paths["ffcv"], problems)
    if "dali" in opts.formats:
        streams["dali"] = _shard_samples(paths["dali"], opts.shard_size, problems)
    same_bytes = opts.write_mode == "jpg" and len(streams) == 2
    for index, row in enumerate(zip_longest(labels, *streams.values())):
        expected, samples = row[0], dict(zip(streams, row[1:], strict=True))
        for fmt, sample in samples.items():
            where = f"{split} {fmt} sample {index}"
            if sample is None or expected is None:
                problems.add(f"{split} {fmt}", f"holds a different number of samples than the "
                                               f"{len(labels)} expected")
                continue
            label, data, size, is_jpeg = sample
            if label != expected:
                problems.add(where, f"label {label}, source label {expected}")
            _check_image(where, data, size, is_jpeg, opts.resolution(split), problems)
        if same_bytes and None not in samples.values() and \
                samples["ffcv"][1] != samples["dali"][1]:
            problems.add(f"{split} sample {index}", "FFCV and DALI hold different JPEG bytes")


def _check_image(where: str, data: bytes, size: tuple[int, int], is_jpeg: bool, max_res: int,
                 problems: _Problems) -> None:
    if max(size) > max_res or min(size) < 1:
        problems.add(where, f"size {size[0]}x{size[1]} outside 1..{max_res}")
    if not is_jpeg:
        if len(data) != size[0] * size[1] * 3:
            problems.add(where, f"raw image of {len(data)} bytes for {size[0]}x{size[1]}x3")
        return
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        problems.add(where, "JPEG without start or end marker")
        return
    try:
        header_size = Image.open(io.BytesIO(data)).size  # reads the header only
    except Exception as e:
        problems.add(where, f"unreadable JPEG header ({type(e).__name__})")
        return
    if header_size != size:
        problems.add(where, f"JPEG header says {header_size}, index says {size}")


def _beton_samples(path: Path, problems: _Problems) -> Iterator[tuple]:
    """(label, bytes, (width, height), is_jpeg) per sample, read with ffcv's own Reader."""
    try:
        from ffcv.reader import Reader
    except ImportError:
        raise ConvertError("--verify reads .beton files with ffcv, which is not installed "
                           "(pip install -e '.[ffcv]'); --formats=dali verifies the shards only"
                           ) from None

    if not path.is_file():
        problems.add(str(path), "missing")
        return
    reader = Reader(str(path))
    image, labels = reader.metadata["f0"], reader.metadata["f1"]
    table = reader.alloc_table[np.argsort(reader.alloc_table["sample_id"], kind="stable")]
    if len(table) != reader.num_samples:
        problems.add(str(path), f"{len(table)} allocations for {reader.num_samples} samples")
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for i in range(reader.num_samples):
            ptr, size = int(table["ptr"][i]), int(table["size"][i])
            if ptr != int(image["data_ptr"][i]):
                problems.add(f"{path} sample {i}", "metadata and allocation table disagree")
            yield (int(labels[i]), bytes(data[ptr:ptr + size]),
                   (int(image["width"][i]), int(image["height"][i])),
                   int(image["mode"][i]) == JPG_MODE)


def _shard_samples(shard_dir: Path, shard_size: int, problems: _Problems) -> Iterator[tuple]:
    """(label, bytes, (width, height), True) per sample, checking each index file on the way."""
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        problems.add(str(shard_dir), "no shards")
    index = 0
    for shard, tar_path in enumerate(tars):
        if tar_path.stem != shard_name(shard):
            problems.add(str(tar_path), f"expected {shard_name(shard)}.tar")
        lines = tar_path.with_suffix(".idx").read_text().splitlines()
        members = _members_by_sample(tar_path)
        if lines[0] != f"{INDEX_VERSION} {len(members)}" or len(lines) != len(members) + 1:
            problems.add(str(tar_path), f"index header {lines[0]!r} for {len(members)} samples")
        if len(members) != shard_size and shard != len(tars) - 1:
            problems.add(str(tar_path), f"{len(members)} samples, shard size {shard_size}")
        with tarfile.open(tar_path) as tar:
            for line, (key, parts) in zip(lines[1:], members, strict=False):
                if key != sample_key(index):
                    problems.add(str(tar_path), f"key {key}, expected {sample_key(index)}")
                listed = " ".join(f"{m.name.split('.', 1)[1]} {m.offset_data} {m.size} {m.name}"
                                  for m in parts)
                if line != listed:
                    problems.add(str(tar_path), f"index line {line!r}, archive has {listed!r}")
                data = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in parts}
                yield _tar_sample(data)
                index += 1


def _members_by_sample(tar_path: Path) -> list[tuple[str, list[tarfile.TarInfo]]]:
    grouped: list[tuple[str, list[tarfile.TarInfo]]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if grouped and grouped[-1][0] == key:
                grouped[-1][1].append(member)
            else:
                grouped.append((key, [member]))
    return grouped


def _tar_sample(data: dict[str, bytes]) -> tuple:
    jpeg = data.get("jpg", b"")
    try:
        size = Image.open(io.BytesIO(jpeg)).size
    except Exception:
        size = (0, 0)
    label = int(data["cls"]) if data.get("cls", b"").isdigit() else -1
    return label, jpeg, size, True
