"""A timm ViT through the whole path (issue #24), e2e layer: the demo data trains a ViT-Tiny above
chance; its exported safetensors and hf folder serve k-NN and transfer; resume after kill -9
mid-epoch is exact for a ViT as for a ResNet."""
import json
import os

import pytest

from pipelines.demo_data import PATTERNS, write_dataset
from trex_fast.config import make_config
from trex_fast.train import run

timm = pytest.importorskip("timm")
VIT = "timm/vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """`--preset=demo --arch=timm/vit_tiny_patch16_224` with small crops: 1 x 32 px + 1 x 16 px
    (2 x 2 and 1 x 1 patch grids), 4 epochs of 8 steps at batch 16, the demo's SGD."""
    root = tmp_path_factory.mktemp("vit")
    write_dataset(str(root / "data"), train_per_class=16, val_per_class=5)
    cfg = make_config("demo", arch=VIT, data=str(root / "data"), output_dir=str(root / "run"),
                      batch_size=16, epochs=4, global_size=32, local_size=16, local_crops=1,
                      memory_size=128, num_workers=0, eval_every=0)
    return root, run(cfg)


@pytest.mark.slow
def test_demo_trains_a_vit_above_chance(vit_run):
    _, result = vit_run
    assert result["val_top1"] >= 2 * 100.0 / len(PATTERNS), result


@pytest.mark.slow
def test_exported_vit_serves_in1k_knn_and_transfer_and_its_card_holds_the_run(vit_run):
    from trex_fast.eval.export import ExportSettings, export
    from trex_fast.eval.in1k import In1kSettings, evaluate_in1k
    from trex_fast.eval.knn import KnnSettings, evaluate_knn
    from trex_fast.eval.transfer import TransferSettings, evaluate_transfer, summary

    root, result = vit_run
    checkpoint = str(root / "run" / "checkpoint.pt")
    export(ExportSettings(checkpoint, str(root / "model.safetensors")))
    export(ExportSettings(checkpoint, str(root / "hf"), format="hf"))
    card = (root / "hf" / "README.md").read_text()
    assert f"{result['val_top1']:.2f} %" in card and f"- arch: {VIT}" in card
    data = root / "data"
    in1k = evaluate_in1k(In1kSettings(checkpoint, str(data / "val"), num_workers=0,
                                      device="cpu"))
    knn = evaluate_knn(KnnSettings(str(root / "model.safetensors"), str(data / "train"),
                                   str(data / "val"), arch=VIT, image_size=32, num_workers=0,
                                   device="cpu"))
    transfer = summary(evaluate_transfer(TransferSettings(
        str(root / "hf"), (str(data),), arch=VIT, trials=1, seeds=1, image_size=32,
        output_dir=str(root / "transfer"), cache_dir=str(root / "cache"), num_workers=0,
        device="cpu")).report)
    assert in1k["top1"] == pytest.approx(result["val_top1"], abs=1e-6)  # the training head
    assert knn["eval"] == "knn" and 0 <= knn["top1"] <= 100
    assert transfer["eval"] == "transfer" and transfer["top1"]
    assert os.path.isfile(root / "transfer" / "transfer.json")


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_ends_like_an_uninterrupted_vit_run(demo_data, tmp_path):
    """The ResNet test's machinery (tests/_runs.py) with timm's 6-block test ViT, AdamW,
    drop path (draws from the checkpointed RNG) and gradient clipping."""
    from tests._runs import EVERY_READ, FLAGS, assert_same_run, kill_9_at_first_checkpoint
    from tests._runs import run_config as survive_config

    data = demo_data
    vit = dict(arch="timm/test_vit", optimizer="adamw", lr=1e-3, drop_path=0.1, clip_grad=1.0)
    whole, out = tmp_path / "whole", tmp_path / "killed"
    run(survive_config(str(data), whole, **EVERY_READ, **vit))
    first = kill_9_at_first_checkpoint({**FLAGS, **EVERY_READ, **vit, "data": str(data)}, out)
    assert first["step"] < 8, "the run finished before it was killed"
    run(survive_config(str(data), out, **EVERY_READ, **vit))  # the same command again
    assert_same_run(out, whole, epochs=2)


@pytest.mark.slow
def test_a_vit_step_runs_under_bf16_autocast_and_dynamo(capsys):
    """tools/bench_step.py's step (EMA and enqueue included) with timm's test ViT in bf16,
    compiled by Dynamo (the eager backend: tracing without inductor's code generation)."""
    import torch

    from tests.integration.test_bench_step import _load_bench_step

    try:
        _load_bench_step().main(preset="trex", arch="timm/test_vit", batch_size=2,
                                global_size=32, local_size=16, local_crops=2, steps=1, warmup=1,
                                device="cpu", precision="bf16", num_classes=5, compile=True,
                                compile_backend="eager")
    finally:
        torch._dynamo.reset()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "error" not in record, record
    assert record["precision"] == "bf16" and record["compiled_graphs"] >= 1
    assert record["gflop_per_sample"] > 0
