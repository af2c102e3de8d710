"""Weighted k-NN top-1 on frozen L2-normalised backbone features (RECIPE.md "Evaluation")."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trex_fast.availability import resolve_device
from trex_fast.cli import flag, required
from trex_fast.eval.features import AUTO_WORKERS, extract_features, image_folder, trust_help
from trex_fast.models.weights import load_backbone


@dataclass(frozen=True)
class KnnSettings:
    """`python -m trex_fast.eval knn`: its flags."""
    backbone: str = required("weights file (trex_fast checkpoint, backbone.pth, torchvision or "
                             "released)")
    train: str = required("ImageFolder of the labelled (memory) images")
    val: str = required("ImageFolder of the images to classify")
    arch: str = flag("resnet50", "backbone architecture: a torchvision ResNet or timm/<name> "
                                 "(trex_fast.models.registry)")
    k: int = flag(20, "neighbours")
    temperature: float = flag(0.07, "of the exp(cosine / T) vote weights")
    image_size: int = flag(224, "centre-crop side (Resize to 256/224 of it first)")
    batch_size: int = flag(128, "images per forward pass")
    num_workers: int = flag(AUTO_WORKERS, "data-loading workers; -1: this machine's cores")
    device: str = flag("auto", "auto, cpu or cuda")
    trust_file: bool = flag(False, trust_help("--backbone"))


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024) -> float:
    """Weighted k-NN on L2-normalised features: each of the k nearest training samples votes
    for its class with weight exp(cosine / temperature). Returns top-1 in percent."""
    train = F.normalize(train_feats.float(), dim=1)
    num_classes = int(train_labels.max()) + 1
    k = min(k, train.shape[0])
    hits = 0
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sims, idx = (query @ train.t()).topk(k, dim=1)  # [q, k]
        votes = torch.zeros(query.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        hits += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return 100.0 * hits / test_feats.shape[0]


def evaluate_knn(s: KnnSettings) -> dict:
    """k-NN top-1 of a backbone file: {'eval': 'knn', 'k', 'temperature', 'top1'}."""
    train_images = image_folder(s.train, s.image_size, "train")
    val_images = image_folder(s.val, s.image_size, "val")
    device = resolve_device(s.device)
    net = load_backbone(s.backbone, s.arch, s.trust_file)
    train_feats, train_labels = extract_features(net, train_images, device, s.batch_size,
                                                 s.num_workers, desc="train")
    val_feats, val_labels = extract_features(net, val_images, device, s.batch_size,
                                             s.num_workers, desc="val")
    top1 = knn_top1(train_feats, train_labels, val_feats, val_labels, s.k, s.temperature)
    return {"eval": "knn", "k": s.k, "temperature": s.temperature, "top1": top1}
