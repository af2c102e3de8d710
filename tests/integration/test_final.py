"""The end of a run (issue #25): the training head's IN1K top-1 in fp32 on the original val
JPEGs when found (else the run's own val data, said so), and the linear probe only when asked.
Unit level: a tiny state that was never trained, tiny ImageFolder trees, no training run."""
import json
import os

import pytest
import torch

from pipelines import atomic
from pipelines.demo_data import PATTERNS, write_dataset
from tests.helpers import SINGLE, tiny_config
from trex_fast.build import build_state
from trex_fast.config import ConfigError
from trex_fast.data import build_val
from trex_fast.eval import final
from trex_fast.eval.in1k import evaluate
from trex_fast.eval.transfer import TransferSettings
from trex_fast.models.net import backbone_state_dict
from trex_fast.plan import make_plan

CLASSES = len(PATTERNS)
LAST = {"epoch": 2, "val_top1": 12.5}


@pytest.fixture(scope="module")
def in1k(tmp_path_factory):
    """An ImageNet-layout root: train/ and val/ of the demo's 8 classes (2 val images each)."""
    root = tmp_path_factory.mktemp("final") / "imagenet"
    write_dataset(str(root), train_per_class=3, val_per_class=2)
    return root


def _setup(data_root, out, pipeline="reference", **flags):
    cfg = tiny_config(num_workers=0, output_dir=str(out), batch_size=16,  # 1 val batch
                      pipeline=pipeline, **flags)
    plan = make_plan(cfg, SINGLE, CLASSES, steps_per_epoch=10, data_root=str(data_root),
                     pipeline=pipeline)
    return cfg, plan, build_state(cfg, plan)


def _spy_autocast(state) -> list:
    """Record, per call of the online network's embed, whether autocast is on and the dtypes."""
    seen, embed = [], state.online.embed

    def spied(images):
        z = embed(images)
        seen.append((torch.is_autocast_enabled("cpu"), images.dtype, z.dtype))
        return z

    state.online.embed = spied
    return seen


def _converted(tmp_path, src):
    """A converted-data folder as the FFCV pipeline reads it: meta.json (classes, source)."""
    conv = tmp_path / "converted"
    conv.mkdir()
    classes = sorted(os.listdir(os.path.join(src, "train")))
    (conv / "meta.json").write_text(json.dumps({"classes": classes, "options": {"src": str(src)}}))
    return conv


def test_the_head_is_fp32_on_the_original_val_even_in_a_bf16_run(in1k, tmp_path):
    cfg, plan, state = _setup(in1k, tmp_path, precision="bf16")
    assert plan.precision == "bf16"
    fin = final.plan_final(cfg, plan)
    assert fin.val_folder == str(in1k / "val") and fin.probe_root is None
    seen = _spy_autocast(state)
    own_val = build_val(cfg, plan, plan.loader_settings())  # the run's, in bf16
    record = final.final_figures(cfg, plan, state, fin, own_val, "unused.pth", LAST)
    assert seen and all(s == (False, torch.float32, torch.float32) for s in seen)
    assert record["in1k_head_images"] == 2 * CLASSES
    assert record["in1k_head_on_original_val"] is True
    assert record["in1k_head_source"] == f"original val JPEGs at {in1k / 'val'} (<data>/val)"
    assert record["in1k_head_transform"] == "Resize(37) + CenterCrop(32)"
    assert record["in1k_probe_top1"] is None and record["val_precision"] == "bf16"
    written = json.loads((tmp_path / final.FINAL_JSON).read_text())
    assert written["in1k_head_top1_fp32"] == record["in1k_head_top1_fp32"]
    seen.clear()  # the control: the per-epoch path runs the head under the run's bf16 autocast
    evaluate(state, own_val)
    assert seen and all(on and z == torch.bfloat16 for on, _, z in seen)
    lines = "\n".join(final.report_lines(record))
    assert "training head, fp32 (in1k_head_top1_fp32)" in lines and "per-epoch val_top1 (bf16" \
        in lines and "linear probe (in1k_probe_top1): not run" in lines


def test_converted_data_finds_the_source_val_or_falls_back_and_says_so(in1k, tmp_path,
                                                                        monkeypatch):
    conv = _converted(tmp_path, in1k)
    cfg, plan, _ = _setup(conv, tmp_path, pipeline="ffcv")
    fin = final.plan_final(cfg, plan)
    assert fin.val_folder == str(in1k / "val")
    assert fin.source.endswith("(the converter's source, meta.json)")
    # the source moved away: the run's own val data, read again in fp32, and the record says so
    meta = json.loads((conv / "meta.json").read_text())
    (conv / "meta.json").write_text(json.dumps({**meta, "options": {"src": str(tmp_path / "x")}}))
    cfg, plan, state = _setup(conv, tmp_path, pipeline="ffcv")
    fin = final.plan_final(cfg, plan)
    assert fin.val_folder is None
    asked = []

    def own_val(cfg, plan, settings):  # stands for FfcvValData (no .beton here)
        asked.append(settings.dtype)
        return [(torch.randn(4, 3, 32, 32), torch.arange(4))]

    monkeypatch.setattr(final, "build_val", own_val)
    record = final.final_figures(cfg, plan, state, fin, None, "unused.pth", LAST)
    assert asked == [torch.float32] and record["in1k_head_images"] == 4
    assert record["in1k_head_on_original_val"] is False
    source = record["in1k_head_source"]
    assert source.startswith(f"the run's own val data, ffcv at {conv / 'val.beton'}")
    assert f"<data>/val {conv / 'val'}: no such directory" in source
    assert f"meta.json {tmp_path / 'x' / 'val'}: no such directory" in source


def test_a_bad_val_images_is_refused_before_training(in1k, tmp_path):
    other = tmp_path / "other"
    write_dataset(str(other), train_per_class=0, val_per_class=1)
    first = sorted((other / "val").iterdir())[0]
    first.rename(other / "val" / "n00000000")  # one class the run does not have
    foreign = r"its 8 class folders are not the run's 8 classes \(not in the run: \['n00000000'\]"
    for folder, says in [(tmp_path / "nope", "no such directory"), (other / "val", foreign)]:
        cfg, plan, _ = _setup(in1k, tmp_path, val_images=str(folder))
        with pytest.raises(ConfigError, match=f"--val_images='{folder}': {says}"):
            final.plan_final(cfg, plan)
    cfg, plan, _ = _setup(in1k, tmp_path, val_images=str(in1k / "val"))
    assert final.plan_final(cfg, plan).source.endswith("(--val_images)")


def test_the_probe_runs_only_when_asked(in1k, tmp_path, monkeypatch):
    cfg, plan, state = _setup(in1k, tmp_path)
    fin = final.plan_final(cfg, plan)
    assert fin.probe_root is None
    monkeypatch.setattr(final, "probe_figure", lambda *a: pytest.fail("probe not asked for"))
    own_val = build_val(cfg, plan, plan.loader_settings())  # fp32: read as it is
    assert final.final_figures(cfg, plan, state, fin, own_val, "x", LAST)["in1k_probe_top1"] \
        is None
    monkeypatch.undo()
    cfg, plan, state = _setup(in1k, tmp_path, final_probe="in1k")
    fin = final.plan_final(cfg, plan)
    assert fin.probe_root == str(in1k)
    backbone = str(tmp_path / "backbone.pth")
    atomic.save_torch(backbone_state_dict(state.online), backbone)
    tiny = TransferSettings(trials=1, seeds=1, sgd_epochs=1, image_size=32, batch_size=32,
                            num_workers=0, cache_dir=str(tmp_path / "cache"))
    record = final.final_figures(cfg, plan, state, fin, own_val, backbone, LAST, tiny)
    assert 0.0 <= record["in1k_probe_top1"] <= 100.0
    probe = record["in1k_probe"]
    assert probe["probe"] == "sgd" and probe["root"] == str(in1k) and probe["n_test"] == 16
    assert probe["n_train"] + probe["n_val"] == 3 * CLASSES
    assert json.loads((tmp_path / final.FINAL_JSON).read_text())["in1k_probe"] == probe


def test_a_probe_without_the_original_train_split_is_refused(in1k, tmp_path):
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    os.symlink(in1k / "val", val_only / "val")
    cfg, plan, _ = _setup(in1k, tmp_path, val_images=str(val_only / "val"), final_probe="in1k")
    with pytest.raises(ConfigError, match=r"--final_probe=in1k: .*train: no such directory"):
        final.plan_final(cfg, plan)


def test_eval_in1k_reads_an_imagefolder_for_an_ffcv_run(in1k, tmp_path, monkeypatch, capsys):
    """`python -m trex_fast.eval in1k` on a checkpoint whose run trained with the FFCV pipeline
    on converted data that is not there: it reads the original val folder alone, in fp32."""
    import runpy
    import sys

    from pipelines.loaders.reference import ReferenceValData
    from trex_fast.checkpoint import make_checkpoint

    cfg, plan, state = _setup(in1k, tmp_path, pipeline="ffcv", data=str(tmp_path / "gone"))
    assert cfg.pipeline == "ffcv" and plan.pipeline == "ffcv"  # the checkpoint's config and plan
    val = ReferenceValData(str(in1k / "val"), cfg.global_size, plan.loader_settings())
    with torch.no_grad():  # a head that is not degenerate: the memory holds val embeddings
        for images, labels in val:
            state.memory.enqueue(state.ema.embed(images), labels)
    checkpoint = tmp_path / "checkpoint.pt"
    atomic.save_torch(make_checkpoint(state, epoch=2, step_in_epoch=0), str(checkpoint))
    monkeypatch.setattr(sys, "argv", ["trex_fast.eval", "in1k", f"--checkpoint={checkpoint}",
                                      f"--val={in1k / 'val'}", "--num_workers=0",
                                      "--batch_size=16", "--device=cpu"])
    runpy.run_module("trex_fast.eval", run_name="__main__")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = evaluate(state, val, fp32=True)
    assert report["images"] == 2 * CLASSES
    assert report["top1"] == pytest.approx(expected["val_top1"], abs=1e-9)
    assert report["top5"] == pytest.approx(expected["val_top5"], abs=1e-9)


def test_the_trade_off_and_the_model_card_take_the_fp32_head_figure(tmp_path):
    """runlog.in1k_head_top1 (eval transfer's plot point, export's model card): final.json's
    fp32 head figure when the run ended with one, else the last validated epoch's val_top1."""
    from pipelines import atomic
    from trex_fast import runlog

    assert runlog.in1k_head_top1(str(tmp_path)) is None
    atomic.write_bytes(str(tmp_path / runlog.METRICS_NAME),
                       b'{"epoch": 1, "val_top1": 40.0}\n{"epoch": 2, "val_top1": 41.5}\n'
                       b'{"epoch": 3}\n')
    assert runlog.in1k_head_top1(str(tmp_path)) == 41.5
    atomic.write_json(str(tmp_path / runlog.FINAL_NAME), {runlog.HEAD_TOP1_FP32: 41.75})
    assert runlog.in1k_head_top1(str(tmp_path)) == 41.75
