"""ImageFolder -> tools/convert_in1k.py -> train with each fast pipeline (the data flow of
DESIGN.md, end to end, at toy size)."""
import json
import subprocess
import sys

import pytest

from pipelines.demo_data import write_dataset
from tests.helpers import REPO, tiny_config
from tests.integration.test_survive import FLAGS as SURVIVE_FLAGS
from tests.integration.test_survive import assert_same_run, kill_9_at_first_checkpoint
from trex_fast.train import run

# 4 steps of 8 images, metric reads every 2 (a clock checkpoint lands on step 2), 1 epoch
FLAGS = dict(SURVIVE_FLAGS, num_workers=1, epochs=1, warmup_epochs=0, log_every=2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src, dst = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("conv") / "out"
    write_dataset(str(src), train_per_class=4, val_per_class=2)  # 32 train, 16 val
    proc = subprocess.run([sys.executable, "tools/convert_in1k.py", f"--src={src}",
                           f"--dst={dst}", "--num_workers=1"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return str(dst)


@pytest.mark.parametrize("pipeline", [
    pytest.param("ffcv", marks=pytest.mark.ffcv), pytest.param("dali", marks=pytest.mark.dali)])
def test_convert_then_train(converted, tmp_path, pipeline):
    out = tmp_path / pipeline
    cfg = tiny_config(data=converted, pipeline=pipeline, output_dir=str(out), batch_size=8,
                      memory_size=32, num_workers=1, epochs=1, warmup_epochs=0)
    result = run(cfg)
    assert result["step"] == 4 and result["val_images"] == 16
    config = json.loads((out / "config.json").read_text())
    assert config["pipeline"] == pipeline and config["resolved"]["num_classes"] == 8
    assert (out / "backbone.pth").is_file()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # the FFCV pipeline replaces and counts images that fail to decode (issue #26); DALI stops
    assert record.get("corrupt_images") == (0 if pipeline == "ffcv" else None)


@pytest.mark.parametrize("pipeline", [
    pytest.param("ffcv", marks=pytest.mark.ffcv), pytest.param("dali", marks=pytest.mark.dali)])
def test_kill_9_mid_epoch_then_rerun_ends_like_an_uninterrupted_run(converted, tmp_path,
                                                                    pipeline):
    """Data order and augmentation draws of the fast pipelines are restored mid-epoch."""
    flags = dict(FLAGS, pipeline=pipeline, data=converted, checkpoint_every_min=1e-9)
    whole = tmp_path / "whole"
    run(tiny_config(output_dir=str(whole), **flags))
    out = tmp_path / "killed"
    first = kill_9_at_first_checkpoint(flags, out)
    assert first["step"] < 4 and first["step_in_epoch"] == first["step"]  # mid-epoch
    run(tiny_config(output_dir=str(out), **flags))
    assert_same_run(out, whole, epochs=1)
