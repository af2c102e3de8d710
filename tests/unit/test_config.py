"""Config presets and rejections: each names the flag and what is accepted."""
import typing

import pytest

from trex_fast.cli import parse_flags
from trex_fast.config import PRESETS, Config, ConfigError, check_world, make_config


def test_presets_follow_the_recipe():
    trex, star, plain = make_config("trex"), make_config("trex_star"), make_config("plain")
    assert (trex.pr_hidden_layers, trex.global_scale, trex.local_scale) == (3, (0.25, 1.0),
                                                                             (0.05, 0.25))
    assert (star.pr_hidden_layers, star.global_scale, star.local_scale) == (1, (0.40, 1.0),
                                                                             (0.05, 0.40))
    assert plain.memory_size == 0 and trex.memory_size == 8192
    for cfg in (trex, star):
        assert (cfg.global_crops, cfg.local_crops, cfg.global_size, cfg.local_size) == (1, 8,
                                                                                      224, 96)
        assert (cfg.lr, cfg.weight_decay, cfg.momentum, cfg.warmup_epochs, cfg.epochs) == (
            0.1, 1e-4, 0.9, 10.0, 100)
        assert (cfg.clf_tau, cfg.ema_momentum, cfg.pr_bottleneck_dim) == (0.1, 0.999, 256)
        assert (cfg.optimizer, cfg.drop_path, cfg.clip_grad) == ("sgd", 0.0, 0.0)
        assert (cfg.arch, cfg.global_pool) == ("resnet50", "default")
    assert set(PRESETS) == {"trex", "trex_star", "plain", "demo", "trex_vit_s", "trex_vit_b"}


def test_explicit_flags_override_the_preset_and_ints_become_floats():
    cfg = make_config("trex_star", pr_hidden_layers=2, lr=1, global_scale=[0.3, 1])
    assert cfg.pr_hidden_layers == 2 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.global_scale == (0.3, 1.0)


@pytest.mark.parametrize("flags, fragment", [
    ({"epochz": 3}, "unknown flag --epochz. Did you mean --epochs"),
    ({"epochs": 1.5}, "--epochs=1.5: expected an integer"),
    ({"lr": "fast"}, "--lr='fast': expected a number"),
    ({"channels_last": 1}, "--channels_last=1: expected True or False"),
    ({"local_size": 256}, "--local_size=256: must be in [16, global_size=224]"),
    ({"memory_size": 32, "batch_size": 64}, "--memory_size=32: must be 0 or >= the global batch"),
    ({"global_scale": (0.0, 1.0)}, "--global_scale=(0.0, 1.0): must be min,max with 0 < min"),
    ({"local_scale": (0.5, 1.2)}, "--local_scale=(0.5, 1.2)"),
    ({"local_scale": (0.5, 0.2)}, "--local_scale=(0.5, 0.2)"),
    ({"local_scale": 0.5}, "expected two numbers"),
    ({"arch": "vit_b"}, "--arch='vit_b': accepted values are resnet18, resnet34"),
    ({"drop_path": 0.1}, "--drop_path=0.1: torchvision resnet50 has no stochastic depth"),
    ({"global_pool": "token"}, "--global_pool='token': torchvision resnet50 pools by average"),
    ({"optimizer": "lamb"}, "--optimizer='lamb': accepted values are sgd, adamw"),
    ({"clip_grad": -1}, "--clip_grad=-1.0: must be >= 0"),
    ({"precision": "fp8"}, "--precision='fp8': accepted values are auto, bf16, fp16, fp32"),
    ({"pipeline": "tfrecord"}, "--pipeline='tfrecord': accepted values are auto, reference"),
    ({"loss_impl": "cuda"}, "--loss_impl='cuda'"),
    ({"device": "tpu"}, "--device='tpu': must be auto, cpu, cuda or cuda:N"),
    ({"ema_momentum": 1.5}, "--ema_momentum=1.5: must be in [0, 1]"),
    ({"clf_tau": 0}, "--clf_tau=0.0: must be > 0"),
    ({"warmup_epochs": 200}, "--warmup_epochs=200.0: must be in [0, epochs=100]"),
    ({"batch_size": 1}, "--batch_size=1: must be >= 2"),
])
def test_rejections_name_the_flag_and_what_is_accepted(flags, fragment):
    with pytest.raises(ConfigError) as e:
        make_config("trex", **flags)
    assert fragment in str(e.value)


def test_unknown_preset_is_rejected():
    with pytest.raises(ConfigError, match="--preset='dino': accepted values are trex"):
        make_config("dino")


def test_memory_must_hold_the_global_batch_of_all_processes():
    cfg = make_config("trex", batch_size=64, memory_size=256)
    check_world(cfg, 4)  # 256 == 4 x 64: fine
    with pytest.raises(ConfigError, match="global batch 512"):
        check_world(cfg, 8)


FLOAT_FLAGS = [name for name, hint in typing.get_type_hints(Config).items()
               if hint in (float, tuple[float, float])]


@pytest.mark.parametrize("name", FLOAT_FLAGS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_every_float_flag_must_be_finite(name, bad):
    value = (0.1, bad) if name.endswith("_scale") else bad
    with pytest.raises(ConfigError, match=f"--{name}=.*must be a finite number"):
        make_config("demo", **{name: value})


def test_1e999_is_refused_as_fire_parses_it():
    assert parse_flags(["--lr=1e999"]) == {"lr": float("inf")}
    with pytest.raises(ConfigError, match=r"--lr=inf: must be a finite number"):
        make_config("demo", **parse_flags(["--lr=1e999"]))
