"""What a run does with the checkpoints it finds and writes (issue #26): an unreadable one is
never overwritten unless --fresh_start says so; non-finite weights are never written; the
non-finite errors name the checkpoint the run leaves, or say that there is none."""
import os

import pytest
import torch

from trex_fast.checkpoint import (
    CheckpointDir,
    NonFiniteWeightsError,
    UnreadableCheckpointError,
    load_checkpoint,
)
from trex_fast.loop import NonFiniteLossError, check_finite


def _ckpt(step: int, value: float = 1.0) -> dict:
    return {"online": {"w": torch.full((3,), value)}, "ema": None, "memory": None,
            "config": {}, "rng": {}, "step": step}


def test_checkpoints_that_all_fail_to_load_stop_the_run_naming_them(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # e.g. cut by a full disk
    older = tmp_path / "checkpoint-step000000004.pt"
    torch.save(_ckpt(4), older)
    older.write_bytes(older.read_bytes()[: older.stat().st_size // 2])  # truncated
    messages = []
    with pytest.raises(UnreadableCheckpointError) as caught:
        CheckpointDir(str(tmp_path), 3).load_latest(log=messages.append)
    text = str(caught.value)
    assert "checkpoint.pt" in text and "checkpoint-step000000004.pt" in text
    assert "--fresh_start=True" in text and "\n" not in text
    assert len(messages) == 2
    assert (tmp_path / "checkpoint.pt").read_bytes() == b""  # left as it was


def test_fresh_start_starts_from_step_0_and_replaces_them(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    messages = []
    ckpts = CheckpointDir(str(tmp_path), 3)
    assert ckpts.load_latest(log=messages.append, fresh_start=True) is None
    assert "--fresh_start=True: starting from step 0" in messages[-1]
    ckpts.save(_ckpt(1))
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1


def test_an_empty_directory_is_a_fresh_run(tmp_path):
    assert CheckpointDir(str(tmp_path / "new"), 3).load_latest() is None


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weights_are_never_written_and_the_error_says_what_is_left(tmp_path, bad):
    ckpts = CheckpointDir(str(tmp_path), 3)
    with pytest.raises(NonFiniteWeightsError, match="there is no checkpoint yet"):
        ckpts.save(_ckpt(1, bad))
    assert os.listdir(tmp_path) == []
    ckpts.save(_ckpt(1))
    with pytest.raises(NonFiniteWeightsError) as caught:
        ckpts.save(_ckpt(2, bad))
    assert f"the last checkpoint ({tmp_path / 'checkpoint.pt'}) is intact" in str(caught.value)
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_the_non_finite_loss_error_says_when_there_is_no_checkpoint(tmp_path):
    read = {"loss_sum": float("inf"), "steps": 1}
    newest = str(tmp_path / "checkpoint.pt")
    with pytest.raises(NonFiniteLossError, match="there is no checkpoint yet") as caught:
        check_finite(read, 1, newest)
    assert "intact" not in str(caught.value)
    CheckpointDir(str(tmp_path), 3).save(_ckpt(1))
    with pytest.raises(NonFiniteLossError, match=r"the last checkpoint \(.*\) is intact"):
        check_finite(read, 2, newest)
