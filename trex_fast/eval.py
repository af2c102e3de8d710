"""`python -m trex_fast.eval <command>`: evaluate backbones (RECIPE.md "Evaluation").

    in1k    top-1/top-5 on an ImageFolder val split with the training head of a trex_fast
            checkpoint (Resize + CenterCrop, scaled to the run's global size); for a linear
            probe on frozen features instead: transfer --probe_kind=sgd --datasets=<IN1K root>
    knn     weighted k-NN top-1 (k=20, T=0.07) on frozen L2-normalised backbone features
    transfer  the paper's linear probes on ImageFolder datasets, with the mean log-odds
    export  a trex_fast checkpoint's backbone as a torchvision state_dict

Backbones load from trex_fast checkpoints, backbone.pth, torchvision state_dicts or released
files with `module.` / `model.` / `encoder.` prefixes (trex_fast.backbone_io). Every file loads
weights-only: one that would run code is refused with a one-line error naming it, unless
--trust_file=True (dangerous: full pickle) is given for a file the user trusts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pipelines.batch import normalize_uint8
from pipelines.reference import ReferenceValData, val_transform
from trex_fast import atomic
from trex_fast.availability import UnavailableError, resolve_device
from trex_fast.backbone_io import export_backbone, load_backbone
from trex_fast.build import build_state
from trex_fast.checkpoint import NotACheckpointError, load_checkpoint, restore
from trex_fast.cli import run_cli
from trex_fast.config import FIELDS, make_config
from trex_fast.distributed import DistInfo
from trex_fast.plan import make_plan
from trex_fast.probes import log_odds, probe
from trex_fast.safe_load import UnsafeFileError, load_file
from trex_fast.validation import evaluate

SINGLE = DistInfo(0, 1, 0, 1)


def transfer_transform(image_size: int) -> T.Compose:
    """RECIPE.md's transfer transform: Resize(224, bicubic) + CenterCrop(224), scaled."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.PILToTensor()])


def _images(root: str, image_size: int, batch_size: int, num_workers: int,
            transform=None) -> DataLoader:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r}: no such ImageFolder directory")
    transform = transform or val_transform(image_size)
    return DataLoader(ImageFolder(root, transform=transform), batch_size=batch_size,
                      num_workers=num_workers)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader: DataLoader,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features [N, F] (fp32, eval-mode BN) and labels [N]."""
    backbone.eval().to(device)
    feats, labels = [], []
    for images, y in loader:
        x = normalize_uint8(images, device, torch.float32, channels_last=False)
        feats.append(backbone(x).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


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


def knn(backbone: str, train: str, val: str, arch: str = "resnet50", k: int = 20,
        temperature: float = 0.07, image_size: int = 224, batch_size: int = 128,
        num_workers: int = 4, device: str = "auto", trust_file: bool = False) -> None:
    """Weighted k-NN top-1 on frozen backbone features.

    Args:
        backbone: weights file (trex_fast checkpoint, backbone.pth, torchvision or released).
        train: ImageFolder of the labelled (memory) images.
        val: ImageFolder of the images to classify.
        arch: torchvision architecture of the backbone.
        k: neighbours.
        temperature: of the exp(cosine / T) vote weights.
        image_size: centre-crop side (Resize to 256/224 of it first).
        batch_size: images per forward pass.
        num_workers: data-loading workers.
        device: auto, cpu or cuda.
        trust_file: DANGEROUS: load --backbone with full pickle, which runs any code a crafted
            file holds; only for a file you trust (default: weights-only, which refuses it).
    """
    dev = resolve_device(device)
    net = load_backbone(backbone, arch, trust_file)
    train_feats, train_labels = extract_features(
        net, _images(train, image_size, batch_size, num_workers), dev)
    val_feats, val_labels = extract_features(
        net, _images(val, image_size, batch_size, num_workers), dev)
    top1 = knn_top1(train_feats, train_labels, val_feats, val_labels, k, temperature)
    print(json.dumps({"eval": "knn", "k": k, "temperature": temperature, "top1": top1}))


@torch.no_grad()
def in1k(checkpoint: str, val: str, batch_size: int = 128, num_workers: int = 4,
         device: str = "auto", trust_file: bool = False) -> None:
    """Top-1/top-5 with the training head (memory prototypes or cosine classifier).

    Args:
        checkpoint: a trex_fast checkpoint.pt.
        val: ImageFolder val split (the same classes as training).
        batch_size: images per forward pass.
        num_workers: data-loading workers.
        device: auto, cpu or cuda.
        trust_file: DANGEROUS: load --checkpoint with full pickle, which runs any code a crafted
            file holds; only for a file you trust (default: weights-only, which refuses it).
    """
    ckpt = load_checkpoint(checkpoint, trust_file, flag="--checkpoint")
    flags = {k: v for k, v in ckpt["config"].items() if k in FIELDS and k not in
             ("preset", "device")}
    # evaluated in fp32 whatever the training precision was
    cfg = make_config(ckpt["config"]["preset"], **{**flags, "precision": "fp32"}, device=device)
    plan = make_plan(cfg, SINGLE, ckpt["num_classes"], steps_per_epoch=1)
    state = build_state(cfg, plan)
    restore(state, ckpt)
    settings = dataclasses.replace(plan.loader_settings(), batch_size=batch_size,
                                   num_workers=num_workers)
    if not os.path.isdir(val):
        raise FileNotFoundError(f"--val={val!r}: no such ImageFolder directory")
    result = evaluate(state, ReferenceValData(val, cfg.global_size, settings))
    print(json.dumps({"eval": "in1k", "top1": result["val_top1"], "top5": result["val_top5"],
                      "images": int(result["val_images"])}))


def _cached_features(net, root: str, cache: str, image_size: int, batch_size: int,
                     num_workers: int, device,
                     trust_file: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one split, extracted once: a finished cache file is reused (resumable)."""
    if os.path.isfile(cache):
        saved = load_file(cache, trust_file)
        return saved["features"], saved["labels"]
    loader = _images(root, image_size, batch_size, num_workers, transfer_transform(image_size))
    feats, labels = extract_features(net, loader, device)
    atomic.save_torch({"features": feats, "labels": labels}, cache)
    return feats, labels


def transfer(backbone: str, datasets: str, arch: str = "resnet50", probe_kind: str = "lbfgs",
             grid_size: int = 12, sgd_epochs: int = 100, image_size: int = 224,
             cache_dir: str = "runs/transfer_cache", batch_size: int = 128,
             num_workers: int = 4, device: str = "auto", trust_file: bool = False) -> None:
    """Linear probes on frozen 2048-d (pre-projector) features, per dataset, and the mean
    log-odds. Each dataset is an ImageFolder root with train/ and test/ (or val/).

    Args:
        backbone: weights file (trex_fast checkpoint, backbone.pth, torchvision or released).
        datasets: comma-separated dataset roots.
        arch: torchvision architecture of the backbone.
        probe_kind: lbfgs (raw features, small datasets) or sgd (L2-normalised, large ones).
        grid_size: hyper-parameter candidates (C values; about its square root per SGD axis).
        sgd_epochs: epochs of each SGD fit.
        image_size: Resize (bicubic) + CenterCrop side.
        cache_dir: where features are cached (reruns reuse them).
        batch_size: images per forward pass.
        num_workers: data-loading workers.
        device: auto, cpu or cuda.
        trust_file: DANGEROUS: load --backbone and the cached features with full pickle,
            which runs any code a crafted file holds; only for files you trust (default:
            weights-only, which refuses them).
    """
    roots = [d for d in str(datasets).split(",") if d]
    dev = resolve_device(device)
    net = load_backbone(backbone, arch, trust_file)
    os.makedirs(cache_dir, exist_ok=True)
    tag = f"{os.path.basename(backbone)}_{arch}_{image_size}"
    results = {}
    for root in roots:
        test_split = "test" if os.path.isdir(os.path.join(root, "test")) else "val"
        name = os.path.basename(os.path.normpath(root))
        splits = [_cached_features(net, os.path.join(root, split),
                                   os.path.join(cache_dir, f"{name}_{split}_{tag}.pt"),
                                   image_size, batch_size, num_workers, dev, trust_file)
                  for split in ("train", test_split)]
        results[name] = probe(*splits[0], *splits[1], kind=probe_kind, grid_size=grid_size,
                              sgd_epochs=sgd_epochs)
    print("| dataset | top-1 | log-odds | best hyper-parameters |\n|---|---|---|---|")
    for name, r in results.items():
        hyper = {k: r[k] for k in ("C", "lr", "wd") if k in r}
        print(f"| {name} | {r['top1']:.2f} | {log_odds(r['top1']):.3f} | {hyper} |")
    mean = sum(log_odds(r["top1"]) for r in results.values()) / len(results)
    print(json.dumps({"eval": "transfer", "top1": {n: r["top1"] for n, r in results.items()},
                      "log_odds_mean": mean}))


def export(checkpoint: str, out: str, arch: str = "", trust_file: bool = False) -> None:
    """Write the backbone of a trex_fast checkpoint as a torchvision state_dict.

    Args:
        checkpoint: a trex_fast checkpoint.pt (or any file backbone_io reads).
        out: the .pth to write; loads into torchvision.models.<arch>() with only fc missing.
        arch: the architecture; default: the one recorded in the checkpoint.
        trust_file: DANGEROUS: load --checkpoint with full pickle, which runs any code a crafted
            file holds; only for a file you trust (default: weights-only, which refuses it).
    """
    if not arch:
        arch = load_checkpoint(checkpoint, trust_file, flag="--checkpoint")["config"]["arch"]
    print(f"wrote {export_backbone(checkpoint, out, arch, trust_file)} ({arch})")


def main(argv: list[str] | None = None) -> None:
    try:
        run_cli({"in1k": in1k, "knn": knn, "transfer": transfer, "export": export}, argv)
    except (UnsafeFileError, FileNotFoundError, NotACheckpointError, UnavailableError) as e:
        # a user's error (a refused, missing or foreign file, an unusable device): one line
        print(f"trex_fast.eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
