"""IN1K-style validation with the training head (RECIPE.md "Evaluation").

The one validation path: training's per-epoch validation, the end-of-run figure in fp32
(trex_fast.eval.final) and `trex_fast.eval in1k` all call `evaluate`. The online network in
eval mode embeds each val image (Resize + CenterCrop), and the head is the one the loss uses:
memory prototypes or the cosine classifier. Ranks hold disjoint shards; their counts are
summed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.loaders.reference import ReferenceValData
from trex_fast import distributed, runlog
from trex_fast.build import build_state
from trex_fast.checkpoint import load_checkpoint, restore
from trex_fast.cli import flag, required
from trex_fast.config import FIELDS, make_config
from trex_fast.distributed import DistInfo
from trex_fast.eval.features import AUTO_WORKERS, loader_workers, trust_help
from trex_fast.kernels.dispatch import prototype_ce_with_top1
from trex_fast.plan import RunPlan, make_plan
from trex_fast.step import TrainState

SINGLE = DistInfo(0, 1, 0, 1)


@dataclass(frozen=True)
class In1kSettings:
    """`python -m trex_fast.eval in1k`: its flags."""
    checkpoint: str = required("a trex_fast checkpoint.pt")
    val: str = required("ImageFolder val split (the same classes as training)")
    batch_size: int = flag(128, "images per forward pass")
    num_workers: int = flag(AUTO_WORKERS, "data-loading workers; -1: this machine's cores")
    device: str = flag("auto", "auto, cpu or cuda")
    trust_file: bool = flag(False, trust_help("--checkpoint"))


@torch.no_grad()
def evaluate(state: TrainState, val_data, fp32: bool = False) -> dict:
    """val_top1 and val_top5 (percent) and val_loss over the whole val split. Counts stay on
    the device until the one host sync at the end (no per-batch .item()). fp32: autocast off
    whatever the run's precision (the end-of-run figure, trex_fast.eval.final); val_data then
    yields fp32 images."""
    precision = contextlib.nullcontext() if fp32 else state.autocast()
    online = state.online
    was_training = online.training
    online.eval()
    class_weight = state.class_weight()  # [C, D]
    unit_weight = F.normalize(class_weight.float(), dim=1)  # [C, D], for the top-5
    top = min(5, class_weight.shape[0])
    # loss sum, top-1 hits, top-5 hits, images
    totals = torch.zeros(4, device=state.device, dtype=torch.float64)
    for images, labels in val_data:
        with precision:
            z = online.embed(images)  # [n, D]
        loss, correct = prototype_ce_with_top1(z, class_weight, labels, state.cfg.clf_tau,
                                               state.loss_impl)
        logits = F.normalize(z.float(), dim=1) @ unit_weight.t()  # [n, C], cosine
        in_top = (logits.topk(top, dim=1).indices == labels[:, None]).any(dim=1)  # [n]
        totals += torch.stack([loss.double() * labels.shape[0], correct.sum().double(),
                               in_top.sum().double(),
                               torch.tensor(labels.shape[0], dtype=torch.float64,
                                            device=state.device)])
    online.train(was_training)
    loss_sum, hits, hits5, count = distributed.all_reduce_sum(totals).tolist()  # the host sync
    if count == 0:
        raise RuntimeError("the val split has no images")
    return {runlog.VAL_TOP1: 100.0 * hits / count, runlog.VAL_TOP5: 100.0 * hits5 / count,
            runlog.VAL_LOSS: loss_sum / count, runlog.VAL_IMAGES: count}


def _restored_state(s: In1kSettings) -> tuple[TrainState, RunPlan]:
    """The checkpoint's run rebuilt in fp32 (whatever it trained in) on --device."""
    ckpt = load_checkpoint(s.checkpoint, s.trust_file, flag="--checkpoint")
    flags = {k: v for k, v in ckpt["config"].items() if k in FIELDS and k not in
             ("preset", "device")}
    cfg = make_config(ckpt["config"]["preset"], **{**flags, "precision": "fp32"},
                      device=s.device)
    plan = make_plan(cfg, SINGLE, ckpt["plan"]["num_classes"], steps_per_epoch=1)
    state = build_state(cfg, plan)
    restore(state, ckpt)
    return state, plan


def evaluate_in1k(s: In1kSettings) -> dict:
    """Top-1/top-5 of a checkpoint's training head: {'eval': 'in1k', 'top1', 'top5',
    'images'}."""
    if not os.path.isdir(s.val):  # before any work
        raise FileNotFoundError(f"--val={s.val!r}: no such ImageFolder directory")
    state, plan = _restored_state(s)
    settings = dataclasses.replace(plan.loader_settings(), batch_size=s.batch_size,
                                   num_workers=loader_workers(s.num_workers))
    result = evaluate(state, ReferenceValData(s.val, state.cfg.global_size, settings))
    return {"eval": "in1k", "top1": result[runlog.VAL_TOP1], "top5": result[runlog.VAL_TOP5],
            "images": int(result["val_images"])}
