"""The one writer (trex_fast.atomic): complete or absent under the final name, fsynced."""
import os
import stat

import pytest

from trex_fast import atomic


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic.write_bytes(str(path), b"old\n")

    def half_then_crash(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(str(path), half_then_crash)
    assert path.read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_the_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic.write_json(str(tmp_path / "config.json"), {"a": 1})
    assert synced == ["file", "dir"]
    synced.clear()
    atomic.save_torch({"x": 1}, str(tmp_path / "backbone.pth"))
    assert synced == ["file", "dir"]
    assert (tmp_path / "config.json").read_text() == '{\n  "a": 1\n}\n'
