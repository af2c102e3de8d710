"""ImageFolder -> tools/convert_in1k.py -> train with each fast pipeline (the data flow of
DESIGN.md, end to end, at toy size), killed with -9 mid-epoch and run again: it ends like the
uninterrupted run (data order and augmentation draws restored mid-epoch)."""
import json
import subprocess
import sys

import pytest

from tests._runs import FLAGS, assert_same_run, kill_9_at_first_checkpoint
from tests.helpers import REPO, tiny_config
from trex_fast.train import run

# 4 steps of 8 images, metric reads every 2 (a clock checkpoint lands on step 2), 1 epoch
E2E_FLAGS = dict(FLAGS, num_workers=1, epochs=1, warmup_epochs=0, log_every=2,
                 checkpoint_every_min=1e-9)


@pytest.fixture(scope="module")
def converted(demo_data, tmp_path_factory):
    """The session's demo ImageFolder (32 train, 16 val) as FFCV betons and DALI shards."""
    dst = tmp_path_factory.mktemp("conv") / "out"
    proc = subprocess.run([sys.executable, "tools/convert_in1k.py", f"--src={demo_data}",
                           f"--dst={dst}", "--num_workers=1"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return str(dst)


def _assert_trained_on_converted_data(out, result, pipeline) -> None:
    assert result["step"] == 4 and result["val_images"] == 16
    config = json.loads((out / "config.json").read_text())
    assert config["pipeline"] == pipeline and config["resolved"]["num_classes"] == 8
    assert (out / "backbone.pth").is_file()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # the FFCV pipeline replaces and counts images that fail to decode (issue #26); DALI stops
    assert record.get("corrupt_images") == (0 if pipeline == "ffcv" else None)


@pytest.mark.parametrize("pipeline", [
    pytest.param("ffcv", marks=pytest.mark.ffcv), pytest.param("dali", marks=pytest.mark.dali)])
def test_convert_train_kill_9_mid_epoch_then_rerun_ends_like_an_uninterrupted_run(
        converted, tmp_path, pipeline):
    flags = dict(E2E_FLAGS, pipeline=pipeline, data=converted)
    whole = tmp_path / "whole"
    _assert_trained_on_converted_data(whole, run(tiny_config(output_dir=str(whole), **flags)),
                                      pipeline)
    out = tmp_path / "killed"
    first = kill_9_at_first_checkpoint(flags, out)
    assert first["step"] < 4 and first["step_in_epoch"] == first["step"]  # mid-epoch
    run(tiny_config(output_dir=str(out), **flags))
    assert_same_run(out, whole, epochs=1)
