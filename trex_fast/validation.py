"""IN1K-style validation with the training head (RECIPE.md "Evaluation").

The online network in eval mode embeds each val image (Resize + CenterCrop), and the head is
the one the loss uses: memory prototypes or the cosine classifier. Ranks hold disjoint shards;
their counts are summed.
"""
from __future__ import annotations

import torch

from trex_fast import distributed
from trex_fast.losses import prototype_ce_with_top1
from trex_fast.step import TrainState


@torch.no_grad()
def evaluate(state: TrainState, val_data) -> dict:
    """Returns val_top1 (percent) and val_loss over the whole val split (a host sync)."""
    core = state.core
    was_training = core.training
    core.eval()
    class_weight = state.class_weight()  # [C, D]
    totals = torch.zeros(3, device=state.device, dtype=torch.float64)  # loss sum, hits, count
    for images, labels in val_data:
        with state.autocast():
            z = core.embed(images)  # [n, D]
        loss, correct = prototype_ce_with_top1(z, class_weight, labels, state.cfg.clf_tau,
                                               state.loss_impl)
        totals += torch.stack([loss.double() * labels.shape[0], correct.sum().double(),
                               torch.tensor(labels.shape[0], dtype=torch.float64,
                                            device=state.device)])
    core.train(was_training)
    loss_sum, hits, count = distributed.all_reduce_sum(totals).tolist()
    if count == 0:
        raise RuntimeError("the val split has no images")
    return {"val_top1": 100.0 * hits / count, "val_loss": loss_sum / count, "val_images": count}
