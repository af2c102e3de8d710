"""ImageFolder -> tools/convert_in1k.py -> train with each fast pipeline (the data flow of
DESIGN.md, end to end, at toy size)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import tiny_config
from trex_fast.demo_data import write_dataset
from trex_fast.train import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
