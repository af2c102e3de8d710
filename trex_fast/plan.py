"""The RunPlan: every fact of a run resolved once (issue #15), then read, never re-derived.

`plan_run(cfg, dist_info)` asks trex_fast.availability to decide each "auto" flag (device,
precision, loss_impl, pipeline, decode, workers, SyncBN) and the multi-crop stage's impl (with
loss_impl=auto's one fact, so both fall back to torch together), counts the dataset's classes
(trex_fast.data.count_classes), builds the loaders from the plan's loader view, and freezes the
plan with the steps per epoch the train loader takes. config.json's "resolved" block is
`plan.to_dict()`; each checkpoint stores it, and resume compares the stored plan with the new
one (trex_fast.checkpoint.check_resumable).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from pipelines.batch import LoaderSettings
from trex_fast import availability
from trex_fast.config import (
    FREE,
    MATCH,
    RECIPE_GLOBAL_BATCH,
    RECIPE_PRESETS,
    Config,
    check_resume_roles,
    check_world,
    global_batch,
    role_field,
)
from trex_fast.distributed import DistInfo
from trex_fast.models import registry

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class RunPlan:
    """Each fact declares its resume role (trex_fast.config.RESUME_ROLES): MATCH facts must
    be the checkpoint's; FREE ones may differ (the schedule's derived steps and LR are checked
    through the Config fields they come from)."""

    device: str = role_field(FREE)  # e.g. "cpu", "cuda:3": this process's device
    precision: str = role_field(MATCH)  # bf16 | fp16 | fp32
    loss_impl: str = role_field(FREE)  # torch | triton
    # torch | triton: the multi-crop stage (FFCV, DALI); falls back with the loss
    stage_impl: str = role_field(FREE)
    pipeline: str = role_field(MATCH)  # reference | ffcv | dali
    # cpu | gpu (FFCV's JPEG decode; the other pipelines record it unused)
    decode: str = role_field(FREE)
    sync_bn: bool = role_field(FREE)
    workers: int = role_field(FREE)  # data-loading workers per process
    rank: int = role_field(FREE)
    local_rank: int = role_field(FREE)
    world_size: int = role_field(MATCH)
    batch_size: int = role_field(FREE)  # per process
    global_batch: int = role_field(MATCH)  # batch_size x world_size
    num_classes: int = role_field(MATCH)
    steps_per_epoch: int = role_field(MATCH)
    total_steps: int = role_field(FREE)  # epochs x steps_per_epoch
    warmup_steps: int = role_field(FREE)
    peak_lr: float = role_field(FREE)  # lr per 256 images x global_batch / 256
    seed: int = role_field(FREE)
    channels_last: bool = role_field(FREE)  # --channels_last, where the registry says it helps
    data_root: str = role_field(FREE)
    output_dir: str = role_field(FREE)
    is_main: bool = role_field(FREE)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.precision]

    def loader_settings(self) -> LoaderSettings:
        """The part of the plan every pipeline's loader reads."""
        return LoaderSettings(self.batch_size, self.workers, self.seed, self.rank,
                              self.world_size, self.torch_device, self.dtype, self.channels_last,
                              self.stage_impl)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


check_resume_roles(RunPlan)

def output_dir(cfg: Config) -> str:
    return cfg.output_dir or os.path.join("runs", cfg.preset)


def schedule_facts(lr: float, epochs: int, warmup_epochs: float, global_batch: int,
                   steps_per_epoch: int) -> dict:
    """The LR schedule's plan entries: the rule resume also applies to a checkpoint's config."""
    return {"steps_per_epoch": steps_per_epoch, "total_steps": epochs * steps_per_epoch,
            "warmup_steps": int(round(warmup_epochs * steps_per_epoch)),
            "peak_lr": lr * global_batch / 256}  # --lr is per 256 images


def _schedule(cfg: Config, global_batch: int, steps_per_epoch: int) -> dict:
    return schedule_facts(cfg.lr, cfg.epochs, cfg.warmup_epochs, global_batch, steps_per_epoch)


def make_plan(cfg: Config, dist_info: DistInfo, num_classes: int, steps_per_epoch: int,
              data_root: str = "", pipeline: str = "reference", device=None) -> RunPlan:
    """The plan of a run whose data facts are known (tests, benchmarks and eval call this
    directly; plan_run finds the facts by building the loaders)."""
    check_world(cfg, dist_info.world_size)
    device = torch.device(device) if device is not None else availability.resolve_device(
        cfg.device, dist_info.local_rank)
    images_per_step = global_batch(cfg, dist_info.world_size)
    return RunPlan(
        device=str(device),
        precision=availability.resolve_precision(cfg.precision, device),
        loss_impl=availability.resolve_loss_impl(cfg.loss_impl, device),
        stage_impl=availability.kernel_impl(device),
        pipeline=pipeline,
        decode=availability.resolve_decode(cfg.decode, device),
        sync_bn=availability.resolve_sync_bn(cfg.sync_bn, device, dist_info.world_size),
        workers=availability.resolve_workers(cfg.num_workers, dist_info.local_world_size),
        rank=dist_info.rank, local_rank=dist_info.local_rank, world_size=dist_info.world_size,
        batch_size=cfg.batch_size, global_batch=images_per_step,
        num_classes=num_classes, **_schedule(cfg, images_per_step, steps_per_epoch),
        seed=cfg.seed, channels_last=cfg.channels_last and registry.channels_last(cfg.arch),
        data_root=data_root, output_dir=output_dir(cfg), is_main=dist_info.is_main,
    )


def plan_run(cfg: Config, dist_info: DistInfo, device=None):
    """(plan, train data, val data) of a training run: the loaders are built from the plan's
    own loader view, so what they were given and what the plan says cannot differ. The number
    of classes is the dataset's (trex_fast.data.count_classes); steps per epoch are the
    loader's, which cuts each rank's share to whole batches."""
    from trex_fast.data import build_data, count_classes, resolve_data_root

    root = resolve_data_root(cfg)
    pipeline = availability.resolve_pipeline(cfg.pipeline, root)
    draft = make_plan(cfg, dist_info, num_classes=count_classes(root, pipeline),
                      steps_per_epoch=0, data_root=root, pipeline=pipeline, device=device)
    train_data, val_data = build_data(cfg, draft)
    plan = dataclasses.replace(draft, **_schedule(cfg, draft.global_batch,
                                                  train_data.steps_per_epoch))
    return plan, train_data, val_data


def batch_deviation(cfg: Config, plan: RunPlan) -> str | None:
    """The line a recipe run at another global batch must print (RECIPE.md: "a run at another
    global batch is a deviation and must say so"), or None. --batch_size is per process, so a
    one-GPU `--preset=trex` trains at 64 unless told otherwise (issue #25, item 5)."""
    if cfg.preset not in RECIPE_PRESETS or plan.global_batch == RECIPE_GLOBAL_BATCH:
        return None
    per_process = RECIPE_GLOBAL_BATCH / plan.world_size
    fix = (f"--batch_size={int(per_process)}" if per_process.is_integer()
           else f"a number of processes that divides {RECIPE_GLOBAL_BATCH}")
    processes = f"{plan.world_size} process{'es' if plan.world_size > 1 else ''}"
    return (f"global batch {plan.global_batch} (batch_size={plan.batch_size} x {processes}) is "
            f"not the recipe's {RECIPE_GLOBAL_BATCH}: the peak LR is {plan.peak_lr:g} (--lr="
            f"{cfg.lr:g} per 256 images) and the EMA and memory bank see {plan.global_batch} "
            f"images per step; for the recipe's batch use {fix}")
