"""The CLI under torchrun: 2 CPU processes (gloo) train, validate on disjoint shards, save."""
import json
import os
import subprocess
import sys

import pytest

from pipelines.demo_data import write_dataset
from tests.helpers import REPO


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_dataset(str(data), train_per_class=4, val_per_class=3)  # 32 train, 24 val
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "trex_fast.train", "--preset=demo", f"--data={data}", f"--output_dir={out}",
           "--arch=resnet18", "--batch_size=4", "--global_size=32", "--local_size=16",
           "--local_crops=2", "--memory_size=16", "--pr_hidden_dim=32", "--num_workers=0",
           "--epochs=1", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_images"] == 24  # each val image counted once across the two shards
    assert record["step"] == 4  # 32 images / (4 per process x 2 processes)
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["global_batch"] == 8
    assert (out / "backbone.pth").is_file() and (out / "checkpoint.pt").is_file()
