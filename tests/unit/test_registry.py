"""The backbone registry (issue #24), unit layer: weight-decay groups per entry, ViT multi-crop
through SDPA, channels-last per entry, named refusals, and weights that load into the library's
own model with only the head missing. No training."""
import json

import pytest
import torch
import torch.nn as nn
import torchvision

from trex_fast.config import ConfigError, make_config
from trex_fast.eval.export import model_card, run_facts, write_hf, write_safetensors
from trex_fast.models import registry
from trex_fast.models.net import backbone_state_dict, build_model
from trex_fast.models.weights import backbone_state
from trex_fast.optim import build_optimizer, param_groups
from trex_fast.train import main

timm = pytest.importorskip("timm")
VIT = "timm/test_vit"  # timm's own 6-block test ViT (patch 16, 64-d): the real classes, cheap
ENTRIES = ("resnet18", VIT, "timm/test_convnext")
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _config(arch: str, **flags):
    sizes = dict(global_size=64, local_size=32) if "convnext" in arch else dict(
        global_size=32, local_size=16)  # a convnext downsamples 32x
    return make_config("demo", arch=arch, local_crops=2, pr_hidden_dim=32, pr_bottleneck_dim=8,
                       memory_size=64, **{**sizes, **flags})


def _decayed_names(model: nn.Module, groups: list[dict]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [g for g in groups if g["weight_decay"] > 0]
    return [names[id(p)] for g in decayed for p in g["params"]]


@pytest.mark.parametrize("arch", ENTRIES)
def test_no_norm_bias_position_embedding_or_class_token_decays(arch):
    model = build_model(_config(arch), num_classes=4)
    groups = build_optimizer(model, _config(arch)).param_groups
    decayed = set(_decayed_names(model, groups))
    norm_params = {f"{m_name}.{p_name}" for m_name, m in model.named_modules()
                   if isinstance(m, NORMS) for p_name, _ in m.named_parameters(recurse=False)}
    assert norm_params and not decayed & norm_params
    assert not [n for n in decayed if n.endswith(".bias")]
    assert not [n for n in decayed if n.split(".")[-1] in ("pos_embed", "cls_token", "reg_token")]
    assert all(len(g["params"]) for g in groups)  # both groups hold something
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert "projector.mlp.0.weight" in decayed  # the projector's weights still decay


def test_the_shape_rule_alone_would_decay_a_vits_position_embedding():
    """Why the registry names them: pos_embed and cls_token are 3-D."""
    model = build_model(_config(VIT), num_classes=4)
    by_shape = set(_decayed_names(model, param_groups(model, 0.05)))
    assert {"backbone.pos_embed", "backbone.cls_token"} <= by_shape
    registered = set(_decayed_names(model, build_optimizer(model, _config(VIT)).param_groups))
    assert not {"backbone.pos_embed", "backbone.cls_token"} & registered


def test_resnet_groups_are_the_recipes_shape_rule():
    model = build_model(_config("resnet18"), num_classes=4)
    groups = build_optimizer(model, _config("resnet18")).param_groups
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(p) for p in g["params"]] for g in param_groups(model, 1e-4)]
    assert isinstance(build_optimizer(model, _config("resnet18")), torch.optim.SGD)


def test_vit_multicrop_runs_each_resolution_once_through_sdpa(monkeypatch):
    """Local crops use the same weights at their own grid (position embedding resized), one
    backbone call per resolution group, attention through scaled_dot_product_attention."""
    model = build_model(_config(VIT), num_classes=4)
    calls, sizes = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    model.backbone.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[-1]))
    z = model(torch.randn(3, 3, 32, 32), torch.randn(6, 3, 16, 16))
    assert z.shape == (9, 8) and sizes == [32, 16]
    tokens = {shape[-2] for shape in calls}  # 2x2 + 1 and 1x1 + 1 tokens
    assert tokens == {5, 2} and len(calls) == 2 * len(model.backbone.blocks)


def test_channels_last_per_entry_and_in_the_plan():
    from tests.helpers import SINGLE
    from trex_fast.plan import make_plan

    assert registry.channels_last("resnet50") and registry.channels_last("timm/convnext_tiny")
    assert not registry.channels_last(VIT)
    for arch, expected in (("resnet18", True), (VIT, False)):
        plan = make_plan(_config(arch, device="cpu"), SINGLE, 4, steps_per_epoch=1)
        assert plan.channels_last is expected


def test_vit_gap_option_and_drop_path_reach_the_model():
    model = build_model(_config(VIT, global_pool="avg", drop_path=0.1), num_classes=4)
    assert model.backbone.global_pool == "avg"
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_unknown_timm_name_is_one_line_with_close_matches():
    with pytest.raises(ConfigError) as e:
        make_config("demo", arch="timm/vit_tiny_patch16")
    text = str(e.value)
    assert "\n" not in text and "timm has no model 'vit_tiny_patch16'" in text
    assert "close matches: " in text and "timm/vit_tiny_patch16_224" in text


def test_a_model_without_the_needed_features_is_refused_before_any_work(tmp_path, capsys):
    """MLP-Mixer mixes a fixed number of tokens: it cannot take the 96 px local crops."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(preset="trex", arch="timm/mixer_s16_224", output_dir=str(out))
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--arch='timm/mixer_s16_224': the model cannot take 96 px crops" in err
    with pytest.raises(ConfigError, match="--global_pool='token': timm refuses it"):
        make_config("demo", arch="timm/test_convnext", global_pool="token")


@pytest.mark.parametrize("arch, reference, head", [
    ("resnet18", lambda: torchvision.models.resnet18(), {"fc.weight", "fc.bias"}),
    (VIT, lambda: timm.create_model("test_vit"), {"head.weight", "head.bias"}),
])
def test_exported_safetensors_load_into_the_librarys_model_with_only_the_head_missing(
        arch, reference, head, tmp_path):
    from safetensors.torch import load_file

    model = build_model(_config(arch), num_classes=4)
    path = write_safetensors(backbone_state_dict(model), str(tmp_path / "model.safetensors"), arch)
    bare = reference()
    result = bare.load_state_dict(load_file(path), strict=False)
    assert set(result.missing_keys) == head and not result.unexpected_keys
    assert registry.head_prefix(arch) == next(iter(head)).rsplit(".", 1)[0]
    x = torch.randn(2, 3, 32, 32)
    model.backbone.eval(), bare.eval()
    if arch == VIT:
        bare.set_input_size(img_size=32)  # timm's own resize of the position embedding
        bare.reset_classifier(0)
    else:
        bare.fc = nn.Identity()
    assert torch.allclose(model.backbone(x), bare(x), atol=1e-5)
    assert set(backbone_state(path, arch)) == set(load_file(path))  # --backbone reads it


def test_hf_folder_holds_config_weights_and_a_card_with_the_runs_figures(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 61.25}) + "\n")
    transfer = {"datasets": [{"dataset": "dtd", "top1_mean": 71.5}], "log_odds_mean": 0.92}
    (run_dir / "transfer").mkdir()
    (run_dir / "transfer" / "transfer.json").write_text(json.dumps(transfer))
    cfg = _config(VIT, optimizer="adamw", lr=5e-4)
    ckpt = {"config": dict(cfg.__dict__), "epoch": 3, "step": 42}
    facts = run_facts(ckpt, str(run_dir))
    model = build_model(cfg, num_classes=4)
    folder = write_hf(str(tmp_path / "hf"), backbone_state_dict(model), facts, 64)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architecture"], config["num_features"]) == ("test_vit", 64)
    card = (tmp_path / "hf" / "README.md").read_text()
    for fact in ("61.25 %", "| dtd | 71.50 |", "0.920", "epochs: 3", "optimizer: adamw",
                 "sariyildiz2023trex", 'timm.create_model("test_vit"'):
        assert fact in card, fact
    assert set(backbone_state(folder, VIT))  # an hf folder is a --backbone too
    assert "not evaluated" in model_card({**facts, "in1k_top1": None, "transfer": None})


def test_a_sweep_grid_crosses_a_resnet_and_a_vit(tmp_path):
    from trex_fast.sweep.points import build_points, parse_grid

    points = build_points({"preset": "demo", "global_size": 32, "local_size": 16},
                          parse_grid(f"arch=resnet18,{VIT}"), [], str(tmp_path))
    assert [p.cfg.arch for p in points] == ["resnet18", VIT]
    assert [p.name for p in points] == ["arch-resnet18", "arch-timm_test_vit"]  # one folder each


@pytest.mark.parametrize("change", [dict(optimizer="adamw"), dict(drop_path=0.1),
                                    dict(global_pool="avg"), dict(clip_grad=1.0)])
def test_resume_refuses_a_change_of_the_new_model_and_optimiser_knobs(change):
    from tests.helpers import SINGLE
    from trex_fast.checkpoint import ResumeError, check_resumable
    from trex_fast.config import to_dict
    from trex_fast.plan import make_plan

    old, new = _config(VIT, device="cpu"), _config(VIT, device="cpu", **change)
    plan = make_plan(new, SINGLE, 4, steps_per_epoch=1)
    ckpt = {"config": to_dict(old), "plan": plan.to_dict(), "step": 0}
    name = next(iter(change))
    with pytest.raises(ResumeError, match=f"{name}: "):
        check_resumable(ckpt, new, plan)


def test_the_core_needs_no_timm_and_a_timm_arch_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    assert make_config("trex").arch == "resnet50"
    with pytest.raises(ConfigError, match=r"timm is not installed; pip install 'trex_fast\[models"):
        make_config("trex", arch=VIT)


def test_an_average_pooled_vit_loads_back_for_knn_and_transfer(tmp_path):
    """--global_pool=avg gives timm's fc_norm in place of norm: --backbone reads it as such."""
    from trex_fast.models.weights import load_backbone

    model = build_model(_config(VIT, global_pool="avg"), num_classes=4)
    path = write_safetensors(backbone_state_dict(model), str(tmp_path / "m.safetensors"), VIT)
    loaded = load_backbone(path, VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model.backbone.eval()(x), atol=1e-6)
