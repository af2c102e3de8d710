"""ImageFolder -> tools/convert_in1k.py -> train with each fast pipeline (the data flow of
DESIGN.md, end to end, at toy size), killed with -9 mid-epoch and run again: it ends like the
uninterrupted run (data order and augmentation draws restored mid-epoch)."""
import json
import os
import subprocess
import sys
from pathlib import Path

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


def _assert_trained_on_converted_data(cfg, converted, result, pipeline) -> None:
    out = Path(cfg.output_dir)
    assert result["step"] == 4 and result["val_images"] == 16
    config = json.loads((out / "config.json").read_text())
    assert config["pipeline"] == pipeline and config["resolved"]["num_classes"] == 8
    assert (out / "backbone.pth").is_file()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # the FFCV pipeline replaces and counts images that fail to decode (issue #26); DALI stops
    assert record.get("corrupt_images") == (0 if pipeline == "ffcv" else None)
    # the end-of-run head figure (issue #25) read the converter's source val JPEGs; without
    # them, reporting the finished run again reads the run's own val data in fp32 and says so
    final = json.loads((out / "final.json").read_text())
    src_val = os.path.join(json.loads((Path(converted) / "meta.json").read_text())["options"]
                           ["src"], "val")
    assert final["in1k_head_source"] == \
        f"original val JPEGs at {src_val} (the converter's source, meta.json)"
    assert final["in1k_head_images"] == 16
    os.rename(src_val, src_val + ".away")
    try:
        run(cfg)
    finally:
        os.rename(src_val + ".away", src_val)
    final = json.loads((out / "final.json").read_text())
    assert final["in1k_head_source"].startswith(f"the run's own val data, {pipeline} at ")
    assert final["in1k_head_on_original_val"] is False and final["in1k_head_images"] == 16
    assert final["in1k_head_top1_fp32"] == pytest.approx(result["val_top1"], abs=1e-9)  # fp32


@pytest.mark.parametrize("pipeline", [
    pytest.param("ffcv", marks=pytest.mark.ffcv), pytest.param("dali", marks=pytest.mark.dali)])
def test_convert_train_kill_9_mid_epoch_then_rerun_ends_like_an_uninterrupted_run(
        converted, tmp_path, pipeline):
    flags = dict(E2E_FLAGS, pipeline=pipeline, data=converted)
    whole = tmp_path / "whole"
    cfg = tiny_config(output_dir=str(whole), **flags)
    _assert_trained_on_converted_data(cfg, converted, run(cfg), pipeline)
    out = tmp_path / "killed"
    first = kill_9_at_first_checkpoint(flags, out)
    assert first["step"] < 4 and first["step_in_epoch"] == first["step"]  # mid-epoch
    run(tiny_config(output_dir=str(out), **flags))
    assert_same_run(out, whole, epochs=1)
