"""One home per fact (issue #23): the fused kernel's production shapes and the metrics.jsonl
keys are each defined once; what quotes or writes them agrees with that definition. Unit tests:
no training, no subprocess.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, tiny_state
from trex_fast import runlog
from trex_fast.data import epoch_data_counts
from trex_fast.eval.in1k import evaluate
from trex_fast.kernels.shapes import PRODUCTION_DIM, PRODUCTION_SHAPES, shape_label, shapes_flag
from trex_fast.loop import EpochTotals

ROOT = Path(REPO)


def test_the_kernel_docs_quote_the_production_shapes_of_the_code():
    text = " ".join((ROOT / "docs" / "KERNELS.md").read_text().split())
    assert f"N x C = {shapes_flag()} with D = {PRODUCTION_DIM}" in text
    assert shapes_flag() == ",".join(f"{n}x{c}" for n, c in PRODUCTION_SHAPES)
    assert shape_label(7, 9) == "N=7,C=9"  # how tools/aot_check.py names a configuration


def test_every_metric_written_is_declared_with_its_unit():
    summary = EpochTotals(sums={"loss_sum": 6.0, "correct": 3, "global_correct": 1, "rows": 6,
                                "images": 2, "steps": 2}, train_seconds=1.0).summary()
    assert summary[runlog.TRAIN_TOP1] == 50.0 and summary[runlog.SAMPLES_PER_S] == 2.0

    class Counted:
        corrupt_images = 2

    counts = epoch_data_counts(Counted(), torch.device("cpu"))
    assert counts == {runlog.CORRUPT_IMAGES: 2}
    state = tiny_state(num_classes=5)
    images = torch.randn(2, 3, 32, 32)
    val = evaluate(state, [(images, torch.tensor([0, 3]))])
    for key in [*summary, *counts, *val]:
        assert runlog.METRIC_UNITS.get(key), key  # declared, with a unit


def test_a_record_with_an_undeclared_key_is_refused_naming_it(tmp_path):
    runlog.append_metrics(str(tmp_path), {runlog.EPOCH: 1, runlog.STEP: 4, runlog.LR: 0.1})
    with pytest.raises(ValueError) as refused:
        runlog.append_metrics(str(tmp_path), {runlog.EPOCH: 2, "val_top_1": 50.0})
    message = str(refused.value)
    assert "['val_top_1']" in message and "METRIC_UNITS" in message and "\n" not in message
    lines = (tmp_path / runlog.METRICS_NAME).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 1, "step": 4, "lr": 0.1}]
