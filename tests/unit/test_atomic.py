"""The one writer (pipelines.atomic): complete or absent under the final name, fsynced."""
import os
import stat

import pytest

from pipelines import atomic


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


def _killed_mid_write(write) -> None:
    """Run write() in a forked child that is killed (os._exit) at its first fsync, as a kill -9
    would leave it: the temporary file complete but never renamed."""
    pid = os.fork()
    if pid == 0:
        os.fsync = lambda fd: os._exit(9)
        write()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


def test_the_temporaries_of_killed_writers_follow_one_rule_and_are_cleaned(tmp_path):
    import torch

    from trex_fast import runlog
    from trex_fast.checkpoint import CheckpointDir

    out = str(tmp_path)
    writers = [lambda: CheckpointDir(out, 3).save({"online": {"w": torch.ones(2)}, "step": 1}),
               lambda: atomic.save_torch({"w": torch.ones(2)}, os.path.join(out, "backbone.pth")),
               lambda: runlog.append_metrics(out, {"epoch": 1})]
    for write in writers:
        _killed_mid_write(write)
    left = sorted(os.listdir(out))
    assert [n.split(".")[1:3] for n in left] == [
        ["backbone", "pth"], ["checkpoint", "pt"], ["metrics", "jsonl"]], left
    live = tmp_path / f".config.json.{os.getpid()}.tmp"  # a live writer's: kept
    live.write_bytes(b"")
    (tmp_path / "notes.tmp").write_bytes(b"")  # not a temporary of ours: kept
    assert sorted(atomic.remove_stale_temps(out)) == [os.path.join(out, n) for n in left]
    assert sorted(os.listdir(out)) == [live.name, "notes.tmp"]


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, *args):
        self._f = open(*args)

    def write(self, data):
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _hidden_by_a_cpp_writer(f):
    """What torch.save's C++ writer can make of it: its own error, the OSError lost."""
    try:
        f.write(b"x")
    except OSError:
        pass
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")


@pytest.mark.parametrize("write", [lambda f: __import__("torch").save({"w": 1}, f),
                                   _hidden_by_a_cpp_writer], ids=["torch.save", "hidden"])
def test_a_full_disk_says_no_space_left_and_names_the_file(tmp_path, monkeypatch, write):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")
    monkeypatch.setattr(atomic, "open", _FullDisk, raising=False)
    with pytest.raises(atomic.NoSpaceError) as caught:
        atomic.write_atomic(str(path), write)
    message = str(caught.value)
    assert "no space left on device" in message and str(path) in message
    assert "inline_container" not in message
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and path.read_bytes() == b"previous"
