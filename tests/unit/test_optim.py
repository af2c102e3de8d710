"""Weight-decay groups by shape and the per-iteration schedule."""
import math

import pytest

from trex_fast.config import make_config
from trex_fast.distributed import DistInfo
from trex_fast.models.net import build_model
from trex_fast.optim import LRSchedule, build_optimizer
from trex_fast.plan import make_plan


def test_weight_decay_only_on_tensors_with_ndim_at_least_2():
    cfg = make_config("plain", arch="resnet18", pr_hidden_dim=64)
    model = build_model(cfg, num_classes=10)
    opt = build_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.classifier.weight for p in decay["params"])  # plain: learned, decayed
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is False


def test_schedule_warmup_end_and_last_step():
    cfg = make_config("trex", epochs=100, warmup_epochs=10, lr=0.1, min_lr=1e-6, batch_size=256,
                      device="cpu")
    plan = make_plan(cfg, DistInfo(0, 2, 0, 2), num_classes=10, steps_per_epoch=50)
    assert plan.global_batch == 512 and plan.total_steps == 5000 and plan.warmup_steps == 500
    sched = LRSchedule.from_plan(cfg, plan)
    peak = 0.1 * 512 / 256
    assert sched.peak_lr == pytest.approx(peak)
    assert sched(0) == 0.0  # linear warm-up from 0
    assert sched(250) == pytest.approx(peak / 2)
    assert sched(500) == pytest.approx(peak)  # warm-up end: the scaled base LR
    assert sched(4999) == pytest.approx(1e-6, abs=1e-12)  # last step: min_lr exactly
    mid = 500 + (4999 - 500) / 2
    assert sched(int(mid)) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(
        math.pi * int(mid - 500) / 4499)))
    values = [sched(s) for s in range(500, 5000)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # cosine is non-increasing
