"""IN1K-style validation with the training head (RECIPE.md "Evaluation").

The one validation path: training's per-epoch validation, the end-of-run figure in fp32
(trex_fast.eval.final) and `trex_fast.eval in1k` all call `evaluate`. The online network in
eval mode embeds each val image (Resize + CenterCrop), and the head is the one the loss uses:
memory prototypes or the cosine classifier. Ranks hold disjoint shards; their counts are
summed.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from trex_fast import distributed
from trex_fast.kernels.dispatch import prototype_ce_with_top1
from trex_fast.step import TrainState


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
    return {"val_top1": 100.0 * hits / count, "val_top5": 100.0 * hits5 / count,
            "val_loss": loss_sum / count, "val_images": count}
