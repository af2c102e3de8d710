"""The demo learns: a short run on the demo dataset ends far above chance."""
import pytest

from pipelines.demo_data import PATTERNS, write_dataset
from trex_fast.config import make_config
from trex_fast.train import run


@pytest.mark.slow
def test_demo_preset_learns_far_above_chance(tmp_path):
    data = tmp_path / "demo"
    write_dataset(str(data), train_per_class=40, val_per_class=10)
    # 6 epochs reach 75 % here (8 reached 81 %, in 50 % more time); loader workers are proven by
    # tests/integration/test_run_ends.py
    cfg = make_config("demo", data=str(data), output_dir=str(tmp_path / "run"), epochs=6,
                      global_size=48, local_size=24, local_crops=2, memory_size=256,
                      num_workers=0, eval_every=6)
    result = run(cfg)
    chance = 100.0 / len(PATTERNS)
    assert result["val_top1"] >= 4 * chance, result
