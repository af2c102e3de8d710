"""Backbone, projector, cosine classifier and the per-resolution multi-crop forward.

RECIPE.md "Model": a backbone of the registry (trex_fast.models.registry: the torchvision
ResNet of the recipe, default init, `fc` replaced by identity, or a timm model without its
head); a projector that is thrown away after training; the backbone runs once per resolution
group so BatchNorm statistics are per resolution (a ViT resizes its position embedding to each
group's grid), and the projector sees all crops of the step at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trex_fast.models.registry import DEFAULT_OPTIONS, BackboneOptions
from trex_fast.models.registry import build_backbone as build_registered


def build_backbone(arch: str, options: BackboneOptions = DEFAULT_OPTIONS
                   ) -> tuple[nn.Module, int]:
    """The registry's backbone of `arch` (head removed) and its pooled feature dimension."""
    backbone = build_registered(arch, options)
    return backbone.module, backbone.feature_dim


class Projector(nn.Module):
    """[L2-norm] -> hidden_layers x [Linear(h) -> BatchNorm1d -> GELU] -> Linear(d, no bias).

    Parameters come in layer order: per hidden layer Linear weight, bias, BN weight, bias;
    then the last Linear weight. Nothing follows the last Linear (no BN, no normalisation).
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, hidden_layers: int,
                 input_l2_norm: bool = True):
        super().__init__()
        self.input_l2_norm = input_l2_norm
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim, bias=False))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_l2_norm:
            x = F.normalize(x.float(), dim=1)  # fp32: the norm of a 2048-d bf16 vector is lossy
        return self.mlp(x)

    def extra_repr(self) -> str:
        return f"input_l2_norm={self.input_l2_norm}"


class CosineClassifier(nn.Module):
    """The plain preset's learned classifier: its weight [C, D] is the loss's class weight
    (both sides L2-normalised, divided by tau, in trex_fast.losses); it gets gradients and
    weight decay.

    It starts from torch.nn.Linear's default init (kaiming-uniform, a = sqrt(5): entries
    U(-1/sqrt(D), 1/sqrt(D)), rows of norm ~ sqrt(1/3) = 0.58 for any D), as the authors' code
    does (RECIPE.md, issue #17). Not the projector's trunc-normal 0.02 (rows of norm 0.32 at
    D = 256): behind the L2-normalisation the weight norm sets the effective learning rate
    early on, ~3x higher with the smaller rows.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # = nn.Linear.reset_parameters

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, num_classes={self.weight.shape[0]}"


class MultiCropNet(nn.Module):
    """Backbone + projector (+ cosine classifier for the plain preset).

    forward(global_crops [G*B,3,Hg,Wg], local_crops [L*B,3,Hl,Wl]) -> z [(G+L)*B, D], crop-major.
    The backbone runs once per resolution group: never merge or pad the groups.
    """

    def __init__(self, backbone: nn.Module, projector: Projector,
                 classifier: CosineClassifier | None = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.classifier = classifier

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projector output of one resolution group (validation, the EMA's global crop)."""
        return self.projector(self.backbone(images))

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor) -> torch.Tensor:
        features = [self.backbone(global_crops)]  # [G*B, F]
        if local_crops.shape[0] > 0:  # shapes are host-side: no sync
            features.append(self.backbone(local_crops))  # [L*B, F]
        return self.projector(torch.cat(features))  # [(G+L)*B, D]


def build_model(cfg, num_classes: int) -> MultiCropNet:
    """The online network of a trex_fast.config.Config: backbone, projector, and the cosine
    classifier when the run has no memory bank."""
    backbone, feature_dim = build_backbone(cfg.arch, BackboneOptions.of(cfg))
    projector = Projector(feature_dim, cfg.pr_hidden_dim, cfg.pr_bottleneck_dim,
                          cfg.pr_hidden_layers, cfg.pr_input_l2_norm)
    classifier = None
    if cfg.memory_size == 0:
        classifier = CosineClassifier(cfg.pr_bottleneck_dim, num_classes)
    return MultiCropNet(backbone, projector, classifier)


def backbone_state_dict(net: MultiCropNet) -> dict[str, torch.Tensor]:
    """The backbone's weights, loadable into the library's bare model of the arch (torchvision
    or timm) with only the classifier head missing."""
    return {k: v.detach().cpu().clone() for k, v in net.backbone.state_dict().items()}
