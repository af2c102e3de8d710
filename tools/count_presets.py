"""What one training step of each preset costs, counted on the meta device (no memory, no compute):

    python tools/count_presets.py                                 # every preset, one JSON line each
    python tools/count_presets.py --presets=trex,trex_vit_s --batch_size=64

Per preset, at its own crops (1 x 224 + 8 x 96 for the recipe's) and `--batch_size` images, for
the network trex_fast.models.net.build_model builds:
- gflop_per_sample: torch's FlopCounterMode over the step's network work (online forward of
  both resolution groups and the projector, the cosine logits against 1000 prototypes and the
  loss, backward, the EMA forward of global crop 0), divided by the batch. The optimiser and the
  memory bank's bookkeeping do no matmul and count nothing.
- params_m / backbone_params_m: trainable parameters of the online network and of its backbone
  (millions; the EMA copy holds as many again, without gradients);
- activation_gib: the tensors autograd saves for backward during the online forward (each
  tensor once), in fp32 (meta tensors take no autocast; a bf16 run saves about half of this).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trex_fast.cli import run_cli  # noqa: E402
from trex_fast.config import PRESETS, make_config  # noqa: E402
from trex_fast.models.net import build_model  # noqa: E402


class SavedTensors:
    """Bytes of the tensors autograd saves for backward while the context is open."""

    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}  # id -> tensor: each counted once

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # weights are not activations
            self.seen.setdefault(id(t), t)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.seen.values())


def _step_work(net, cfg, batch_size: int, num_classes: int, saved: SavedTensors) -> None:
    """The network work of one train_step (trex_fast.step), on meta tensors."""
    def crops(n: int, size: int) -> torch.Tensor:
        return torch.empty(n * batch_size, 3, size, size, device="meta")

    global_crops = crops(cfg.global_crops, cfg.global_size)
    prototypes = F.normalize(torch.empty(num_classes, cfg.pr_bottleneck_dim, device="meta"))
    labels = torch.zeros((cfg.global_crops + cfg.local_crops) * batch_size, dtype=torch.long,
                         device="meta")
    with saved.hooks():
        z = net(global_crops, crops(cfg.local_crops, cfg.local_size))  # [(G+L)*B, D]
        loss = F.cross_entropy(F.normalize(z) @ prototypes.t() / cfg.clf_tau, labels)
    loss.backward()
    with torch.no_grad():
        net.embed(global_crops[:batch_size])  # the EMA network's forward (same shapes)


def count_preset(preset: str, batch_size: int = 64, num_classes: int = 1000) -> dict:
    cfg = make_config(preset, batch_size=batch_size)
    with torch.device("meta"):
        net = build_model(cfg, num_classes)
    saved = SavedTensors()
    with FlopCounterMode(display=False) as counter:
        _step_work(net, cfg, batch_size, num_classes, saved)
    return {"preset": preset, "arch": cfg.arch, "batch_size": batch_size,
            "crops": f"{cfg.global_crops}x{cfg.global_size} + {cfg.local_crops}x{cfg.local_size}",
            "gflop_per_sample": round(counter.get_total_flops() / batch_size / 1e9, 2),
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
            "backbone_params_m": round(sum(
                p.numel() for p in net.backbone.parameters()) / 1e6, 2),
            "activation_gib": round(saved.bytes / 2**30, 2)}


def main(presets: str = ",".join(p for p in PRESETS if p != "demo"), batch_size: int = 64,
         num_classes: int = 1000) -> None:
    """Count each preset's step on the meta device; one JSON line each.

    Args:
        presets: comma-separated preset names.
        batch_size: images per step.
        num_classes: classes of the prototype head (IN1K: 1000).
    """
    names = presets if isinstance(presets, (list, tuple)) else presets.split(",")
    for name in names:
        print(json.dumps(count_preset(name.strip(), batch_size, num_classes)), flush=True)


if __name__ == "__main__":
    run_cli(main)
