"""Deterministic webdataset tar shards with the DALI index file next to each.

Sample i of a split is <key>.jpg + <key>.cls with key = f"{i:08d}", the same i as in the .beton.
`.cls` holds the label as ASCII decimal (webdataset's convention; DALI returns it as raw bytes).
The tar bytes depend only on the samples: USTAR headers with mtime 0, uid/gid 0, no user names,
mode 0644. The index follows DALI's wds2idx v1.2: a line "v1.2 <samples>", then per sample
"<ext> <data offset> <size> <member name>" for each component, space-separated.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from pipelines.errors import BadFileError

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # archives end on a record boundary, as GNU tar and tarfile write
INDEX_VERSION = "v1.2"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


class ShardWriter:
    """Appends samples to <out_dir>/shard-NNNNNN.tar (+ .idx), shard_size samples per shard."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.shards = 0
        self._tar = None
        self._index_lines: list[str] = []

    def add(self, label: int, jpeg: bytes) -> None:
        if self.count % self.shard_size == 0:
            self._close_shard()
            self._tar = open(self.out_dir / f"{shard_name(self.shards)}.tar", "wb")
            self.shards += 1
        key = sample_key(self.count)
        parts = [self._member(f"{key}.jpg", jpeg), self._member(f"{key}.cls", str(label).encode())]
        self._index_lines.append(" ".join(parts))
        self.count += 1

    def _member(self, name: str, data: bytes) -> str:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
        offset = self._tar.tell() + len(header)
        self._tar.write(header + data + bytes(-len(data) % TAR_BLOCK))
        ext = name.split(".", 1)[1]
        return f"{ext} {offset} {len(data)} {name}"

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        end = self._tar.tell() + 2 * TAR_BLOCK  # two zero blocks mark the end of the archive
        self._tar.write(bytes(2 * TAR_BLOCK + (-end % TAR_RECORD)))
        self._tar.flush()
        os.fsync(self._tar.fileno())
        self._tar.close()
        index = f"{INDEX_VERSION} {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n"
        with open(self.out_dir / f"{shard_name(self.shards - 1)}.idx", "w") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        self._tar, self._index_lines = None, []

    def close(self) -> int:
        """Finish the last shard; return the number of shards written."""
        self._close_shard()
        return self.shards


def check_shard(tar: str, index: str) -> None:
    """Raise BadFileError naming `tar` when it is shorter than its index says (a copy cut
    short): DALI would fail mid-epoch, or read zeros, at the first sample past the end."""
    with open(index) as f:
        lines = [line for line in f.read().split("\n")[1:] if line.strip()]
    last = lines[-1].split() if lines else []  # samples are indexed in file order: the last
    ends = [int(last[i + 1]) + int(last[i + 2]) for i in range(0, len(last) - 2, 4)
            if last[i + 1].isdigit() and last[i + 2].isdigit()]
    size = os.path.getsize(tar)
    if ends and max(ends) > size:
        raise BadFileError(f"{tar}: truncated: {size} bytes, but its index {index} puts sample "
                           f"data up to byte {max(ends)}; rerun tools/convert_in1k.py")
