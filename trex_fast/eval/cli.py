"""`python -m trex_fast.eval <command>`: evaluate backbones (RECIPE.md "Evaluation").

    in1k    top-1/top-5 on an ImageFolder val split with the training head of a trex_fast
            checkpoint (Resize + CenterCrop, scaled to the run's global size); for a linear
            probe on frozen features instead: transfer --probe_kind=sgd --datasets=<IN1K root>
    knn     weighted k-NN top-1 (k=20, T=0.07) on frozen L2-normalised backbone features
    transfer  the paper's transfer protocol (Optuna-searched linear probes, seeds averaged) on
            datasets by name in their official layouts or ImageFolder roots: the per-dataset
            top-1 and mean log-odds table, JSON, CSV and the trade-off plot (eval/transfer.py)
    export  a trex_fast checkpoint's backbone as model.safetensors (or .pth), or as a folder
            with config.json and a model card (--format=hf)

Backbones load from trex_fast checkpoints, backbone.pth, torchvision state_dicts or released
files with `module.` / `model.` / `encoder.` prefixes (trex_fast.models.weights). Every file loads
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
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pipelines.batch import normalize_uint8
from pipelines.loaders.reference import ReferenceValData, val_transform
from trex_fast.availability import UnavailableError, resolve_device
from trex_fast.build import build_state
from trex_fast.checkpoint import NotACheckpointError, load_checkpoint, restore
from trex_fast.cli import run_cli
from trex_fast.config import FIELDS, make_config
from trex_fast.distributed import DistInfo
from trex_fast.eval.datasets import DatasetNotReady, resolve_all
from trex_fast.eval.in1k import evaluate
from trex_fast.eval.probes import TRIALS
from trex_fast.eval.report import markdown, write_outputs
from trex_fast.eval.transfer import TransferSettings, backbone_tag, run_transfer
from trex_fast.models.export import ExportError, export_weights
from trex_fast.models.registry import ArchError
from trex_fast.models.weights import load_backbone
from trex_fast.plan import make_plan
from trex_fast.runlog import device_name, git_revision, library_versions
from trex_fast.safe_load import BadFileError

SINGLE = DistInfo(0, 1, 0, 1)


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
        arch: the backbone's --arch (resnet50, timm/vit_small_patch16_224, ...).
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
    plan = make_plan(cfg, SINGLE, ckpt["plan"]["num_classes"], steps_per_epoch=1)
    state = build_state(cfg, plan)
    restore(state, ckpt)
    settings = dataclasses.replace(plan.loader_settings(), batch_size=batch_size,
                                   num_workers=num_workers)
    if not os.path.isdir(val):
        raise FileNotFoundError(f"--val={val!r}: no such ImageFolder directory")
    result = evaluate(state, ReferenceValData(val, cfg.global_size, settings))
    print(json.dumps({"eval": "in1k", "top1": result["val_top1"], "top5": result["val_top5"],
                      "images": int(result["val_images"])}))


def _in1k_top1(backbone: str, report: dict) -> float | None:
    """The model's IN1K top-1 for the trade-off plot: an `in1k` probe in this run, else the
    last val_top1 of the training run the backbone file sits in (metrics.jsonl)."""
    for r in report["datasets"]:
        if r["dataset"] == "in1k":
            return r["top1_mean"]
    metrics = os.path.join(os.path.dirname(os.path.abspath(backbone)), "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            vals = [json.loads(line).get("val_top1") for line in f if line.strip()]
        vals = [v for v in vals if v is not None]
        return vals[-1] if vals else None
    return None


def _entries(flag) -> list[str]:
    """A comma-separated flag (fire may already have split it into a tuple)."""
    items = flag if isinstance(flag, (list, tuple)) else str(flag or "").split(",")
    return [str(e).strip() for e in items if str(e).strip()]


def transfer(backbone: str, datasets: str, data_root: str = ".", arch: str = "resnet50",
             trials: int = TRIALS, seeds: int = 3, probe_kind: str = "auto",
             sgd_epochs: int = 100, image_size: int = 224, output_dir: str = "runs/transfer",
             cache_dir: str = "runs/transfer_cache", compare: str = "",
             in1k_top1: float | None = None, label: str = "", batch_size: int = 128,
             num_workers: int = 4, device: str = "auto", trust_file: bool = False) -> None:
    """The paper's transfer protocol: per dataset, frozen 2048-d (pre-projector) features, an
    Optuna TPE search of the linear probe on a 20 % per-class split, a refit on train + val
    scored on test, averaged over seeds; the table, JSON, CSV and trade-off plot.

    Args:
        backbone: weights file (trex_fast checkpoint, backbone.pth, torchvision or released).
        datasets: comma-separated names (aircraft, cars, dtd, eurosat, flowers, pets, food101,
            sun397, inat2018, inat2019, cog_l1..cog_l5, in1k; layouts in docs/TRANSFER.md)
            and/or ImageFolder roots holding train/ and test/ (or val/).
        data_root: the folder the named datasets sit in, each in its official layout.
        arch: the backbone's --arch (resnet50, timm/vit_small_patch16_224, ...).
        trials: Optuna trials per dataset and seed (the paper: 30).
        seeds: seeds averaged (validation split, sampler, SGD order); mean and std reported.
        probe_kind: auto (the paper's: L-BFGS for the 8 small datasets and ImageFolder roots,
            SGD for IN1K, CoG, iNat), lbfgs or sgd for all.
        sgd_epochs: epochs of each SGD fit (the paper: 100).
        image_size: Resize (bicubic) + CenterCrop side.
        output_dir: where transfer.md/.json/.csv and trade_off.png go.
        cache_dir: features, one folder per backbone (reruns reuse them).
        compare: comma-separated transfer.json files or run folders to draw with this model.
        in1k_top1: this model's IN1K top-1 for the plot (default: an in1k probe of this run,
            else metrics.jsonl next to --backbone).
        label: this model's name in the outputs (default: the backbone's file name).
        batch_size: images per forward pass.
        num_workers: data-loading workers.
        device: auto, cpu or cuda (features and probes).
        trust_file: DANGEROUS: load --backbone and the cached features with full pickle,
            which runs any code a crafted file holds; only for files you trust (default:
            weights-only, which refuses them).
    """
    entries = _entries(datasets)
    if probe_kind not in ("auto", "lbfgs", "sgd"):
        raise ValueError(f"--probe_kind={probe_kind!r}: accepted values are auto, lbfgs, sgd")
    if not entries:
        raise ValueError("--datasets: give at least one dataset name or ImageFolder root")
    # ---- phase 1: every dataset read and checked before any feature is extracted
    data = resolve_all(entries, data_root)
    dev = resolve_device(device)
    net = load_backbone(backbone, arch, trust_file)
    settings = TransferSettings(trials=trials, seeds=seeds, sgd_epochs=sgd_epochs,
                                probe_kind=probe_kind, image_size=image_size,
                                batch_size=batch_size, num_workers=num_workers,
                                cache_dir=cache_dir, trust_file=trust_file)
    # ---- phases 2-4: cached features, searched probes over seeds, outputs
    report = run_transfer(net, backbone_tag(backbone, arch), entries, data, settings, dev)
    report["label"] = label or os.path.basename(backbone)
    report["in1k_top1"] = in1k_top1 if in1k_top1 is not None else _in1k_top1(backbone, report)
    report["env"] = {"git": git_revision(), "libraries": library_versions(),
                     "device": device_name(dev), "backbone": os.path.abspath(backbone),
                     "arch": arch}
    paths = write_outputs(output_dir, report, _entries(compare))
    print(markdown(report), end="")
    print(f"wrote {', '.join(paths)}")
    print(json.dumps({"eval": "transfer",
                      "top1": {r["dataset"]: r["top1_mean"] for r in report["datasets"]},
                      "top1_std": {r["dataset"]: r["top1_std"] for r in report["datasets"]},
                      "log_odds_mean": report["log_odds_mean"],
                      "in1k_probe_top1": report["in1k_probe_top1"],
                      "features_reused": report["features_reused"]}))


def export(checkpoint: str, out: str = "model.safetensors", arch: str = "",
           format: str = "auto", transfer: str = "", trust_file: bool = False) -> None:
    """Write the backbone of a trex_fast checkpoint as shareable weights (models/export.py).

    Args:
        checkpoint: a trex_fast checkpoint.pt (or any file backbone_io reads).
        out: the file (safetensors, pth) or folder (hf) to write; loads into
            timm.create_model(<name>) or torchvision.models.<arch>() with only the head missing.
        arch: the architecture; default: the one recorded in the checkpoint.
        format: auto (pth for an --out ending in .pth/.pt, else safetensors), safetensors, pth,
            or hf (a folder: config.json, model.safetensors, README.md model card).
        transfer: hf: the transfer.json (or its folder) whose results the model card states;
            default: <run>/transfer/transfer.json when present.
        trust_file: DANGEROUS: load --checkpoint with full pickle, which runs any code a crafted
            file holds; only for a file you trust (default: weights-only, which refuses it).
    """
    written, arch, fmt = export_weights(checkpoint, out, arch, format, transfer, trust_file)
    print(f"wrote {written} ({arch}, {fmt})")


def main(argv: list[str] | None = None) -> None:
    try:
        run_cli({"in1k": in1k, "knn": knn, "transfer": transfer, "export": export}, argv)
    except (BadFileError, FileNotFoundError, NotACheckpointError, UnavailableError,
            DatasetNotReady, ArchError, ExportError) as e:
        # a user's error (a refused, unreadable, missing or foreign file, a backbone of another
        # --arch, an unusable device, a missing dataset): one line
        print(f"trex_fast.eval: error: {e}", file=sys.stderr)
        sys.exit(2)

