"""Each Config and RunPlan field declares its resume role once, with the field (issue #23):
the resume check derives what it compares from the roles, a field without a role stops the
import, and checkpoints written before the roles existed still resume. Unit tests: no training.
"""
import dataclasses
import json

import pytest

from trex_fast import checkpoint
from trex_fast.checkpoint import ResumeError, check_resumable
from trex_fast.config import (
    FREE,
    MATCH,
    RESUME_ROLES,
    SCHEDULE,
    Config,
    check_resume_roles,
    fields_with_role,
    make_config,
)
from trex_fast.distributed import DistInfo
from trex_fast.plan import RunPlan, make_plan

# What main (54375c5) wrote into a checkpoint ("config": to_dict(cfg), "plan": plan.to_dict(),
# the plan also being config.json's "resolved" block) for
# make_config("demo", device="cpu", batch_size=8, epochs=2, output_dir="runs/old") and
# make_plan(cfg, DistInfo(0, 1, 0, 1), num_classes=8, steps_per_epoch=4, ...), produced
# by that revision's code, before the fields declared their roles.
OLD_CHECKPOINT = json.loads("""{
"config": {"preset": "demo", "arch": "resnet18", "epochs": 2, "batch_size": 8, "lr": 0.4,
 "weight_decay": 0.0001, "momentum": 0.9, "warmup_epochs": 1.0, "min_lr": 1e-06,
 "pr_hidden_layers": 3, "pr_hidden_dim": 512, "pr_bottleneck_dim": 256,
 "pr_input_l2_norm": true, "memory_size": 1024, "clf_tau": 0.1, "ema_momentum": 0.999,
 "global_crops": 1, "local_crops": 4, "global_size": 64, "local_size": 32,
 "global_scale": [0.25, 1.0], "local_scale": [0.05, 0.25], "precision": "auto",
 "channels_last": true, "compile": false, "loss_impl": "auto", "sync_bn": "auto", "seed": 0,
 "data": "", "pipeline": "auto", "decode": "auto", "device": "cpu", "num_workers": -1,
 "output_dir": "runs/old", "log_every": 10, "eval_every": 1, "tensorboard": false,
 "resume": "", "reschedule": false, "fresh_start": false, "checkpoint_every_min": 20.0,
 "keep_checkpoints": 3, "trust_file": false, "profile_steps": 0, "stop_at_step": 0},
"plan": {"device": "cpu", "precision": "fp32", "loss_impl": "torch", "stage_impl": "torch",
 "pipeline": "reference", "decode": "cpu", "sync_bn": false, "workers": 2, "rank": 0,
 "local_rank": 0, "world_size": 1, "batch_size": 8, "global_batch": 8, "num_classes": 8,
 "steps_per_epoch": 4, "total_steps": 8, "warmup_steps": 4, "peak_lr": 0.0125, "seed": 0,
 "channels_last": true, "data_root": "/data/demo", "output_dir": "runs/old",
 "is_main": true},
"step": 5}""")
# main's hand-written lists in trex_fast/checkpoint.py, which the roles replace
OLD_MATCH = {"arch", "pr_hidden_layers", "pr_hidden_dim", "pr_bottleneck_dim",
             "pr_input_l2_norm", "memory_size", "clf_tau", "ema_momentum", "weight_decay",
             "momentum", "seed", "global_crops", "local_crops", "global_size", "local_size",
             "global_scale", "local_scale"}
# the backbone registry's knobs (issue #24), refused on resume like the model knobs above
BACKBONE_MATCH = {"optimizer", "drop_path", "global_pool", "clip_grad"}
OLD_SCHEDULE = {"epochs", "warmup_epochs", "lr", "min_lr"}
OLD_PLAN = {"global_batch", "world_size", "precision", "num_classes", "steps_per_epoch",
            "pipeline"}


@pytest.mark.parametrize("cls", [Config, RunPlan])
def test_every_field_declares_an_accepted_role(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("resume") in RESUME_ROLES, f.name
    assert sum(len(fields_with_role(cls, r)) for r in RESUME_ROLES) == len(dataclasses.fields(cls))


def test_a_config_field_without_a_role_is_refused_naming_it():
    """What config.py runs at import, on a Config grown by a field that declares no role."""
    @dataclasses.dataclass(frozen=True)
    class Grown(Config):
        vit_patch: int = dataclasses.field(default=16, metadata={"help": "patch side"})

    with pytest.raises(TypeError, match=r"Grown\.vit_patch: resume role None; declare one of "
                                        r"'must match', 'schedule', 'free'"):
        check_resume_roles(Grown)

    @dataclasses.dataclass(frozen=True)
    class Declared(Config):
        vit_patch: int = dataclasses.field(default=16, metadata={"resume": MATCH})

    check_resume_roles(Declared)
    assert fields_with_role(Declared, MATCH)[-1] == "vit_patch"  # and resume would compare it


def test_a_misspelt_role_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Grown:
        depth: int = dataclasses.field(default=12, metadata={"resume": "must-match"})

    with pytest.raises(TypeError, match=r"Grown\.depth: resume role 'must-match'"):
        check_resume_roles(Grown)


def test_the_resume_check_compares_what_main_compared():
    """Deriving the lists from the roles changes nothing about which keys are checked."""
    assert set(checkpoint.MATCH_KEYS) == OLD_MATCH | BACKBONE_MATCH
    assert set(checkpoint.SCHEDULE_KEYS) == OLD_SCHEDULE == set(fields_with_role(Config, SCHEDULE))
    assert set(checkpoint.PLAN_KEYS) == OLD_PLAN
    assert "batch_size" in fields_with_role(Config, FREE)  # checked as the plan's global_batch


def _new_run(**flags):
    cfg = make_config("demo", device="cpu", batch_size=8, epochs=2, output_dir="runs/old",
                      **flags)
    plan = make_plan(cfg, DistInfo(0, 1, 0, 1), num_classes=8, steps_per_epoch=4,
                     data_root="/data/demo", pipeline="reference", device="cpu")
    return cfg, plan


def test_a_checkpoint_written_before_the_roles_resumes_unchanged():
    cfg, plan = _new_run()
    assert check_resumable(OLD_CHECKPOINT, cfg, plan) == []
    cfg, plan = _new_run(num_workers=0, log_every=3, tensorboard=True)  # free flags
    assert check_resumable(OLD_CHECKPOINT, cfg, plan) == []


@pytest.mark.parametrize("flags,named", [
    (dict(arch="resnet34"), "arch: 'resnet18' -> 'resnet34'"),
    (dict(local_scale=(0.1, 0.3)), "local_scale: [0.05, 0.25] -> (0.1, 0.3)"),
    (dict(lr=0.2), "lr: 0.4 -> 0.2: a schedule change"),
    (dict(precision="bf16"), "precision: 'fp32' -> 'bf16'"),
])
def test_an_old_checkpoint_still_refuses_a_change(flags, named):
    cfg, plan = _new_run(**flags)
    with pytest.raises(ResumeError, match="cannot resume") as refused:
        check_resumable(OLD_CHECKPOINT, cfg, plan)
    assert named in str(refused.value)


def test_a_new_field_absent_from_an_old_checkpoint_is_not_a_change():
    old = {**OLD_CHECKPOINT, "config": dict(OLD_CHECKPOINT["config"])}
    del old["config"]["clf_tau"]  # as if clf_tau had been added after the checkpoint
    cfg, plan = _new_run(clf_tau=0.2)
    assert check_resumable(old, cfg, plan) == []
