"""The transfer suite as the paper reports it (RECIPE.md "Evaluation", issue #16).

Phases, in order: (1) read and check every dataset (trex_fast.eval.datasets), so that a missing
one fails before any work; (2) extract each split's frozen pre-projector features once per
backbone, cached on disk in fp16; (3) per dataset and seed, the Optuna-searched probe
(trex_fast.eval.probes); (4) per-dataset top-1 mean/std over seeds, log-odds and their mean over the
transfer datasets (IN1K apart, as in the authors' summary), written by trex_fast.eval.report.
"""
from __future__ import annotations

import hashlib
import os
import statistics
from dataclasses import dataclass

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader

from pipelines import atomic
from pipelines.batch import normalize_uint8
from trex_fast.eval.datasets import ImageList, Labelled, is_path
from trex_fast.eval.probes import log_odds, per_class_split, probe
from trex_fast.models.weights import SAFETENSORS
from trex_fast.safe_load import load_file

CACHE_VERSION = 1  # bump when the extraction changes: older cache files are then ignored
# Reported beside the transfer mean, never in it: the authors' summary (naver/trex,
# transfer/scripts/print_results.py) drops the IN-1K column before averaging log-odds.
NOT_IN_MEAN = ("in1k",)


@dataclass(frozen=True)
class TransferSettings:
    """What one transfer run needs beyond the backbone and the datasets."""
    trials: int = 30
    seeds: int = 3
    sgd_epochs: int = 100
    probe_kind: str = "auto"  # auto: the paper's assignment (transfer_data.SPECS)
    image_size: int = 224
    batch_size: int = 128
    num_workers: int = 4
    cache_dir: str = "runs/transfer_cache"
    trust_file: bool = False


def transfer_transform(image_size: int) -> T.Compose:
    """RECIPE.md's transfer transform: Resize(224, bicubic) + CenterCrop(224), scaled."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.PILToTensor()])


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def backbone_tag(path: str, arch: str) -> str:
    """One cache folder per backbone: its file name, arch and a hash of its bytes (a
    retrained file under the same name gets new features)."""
    digest = hashlib.sha1()
    weights = os.path.join(path, SAFETENSORS) if os.path.isdir(path) else path  # an hf folder
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    name = os.path.basename(os.path.normpath(path))
    return f"{name}_{arch.replace('/', '-')}_{digest.hexdigest()[:12]}"  # timm/<name>: one folder


@torch.no_grad()
def extract(net: torch.nn.Module, images: ImageList, device: torch.device, batch_size: int,
            num_workers: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features [N, F] (eval-mode BN, fp32 compute, fp16 result) and labels."""
    from tqdm import tqdm

    net.eval().to(device)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        x = normalize_uint8(x, device, torch.float32, channels_last=device.type == "cuda")
        feats.append(net(x).half().cpu())  # the .cpu() is the one host sync per batch
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def cached_features(net, images: ImageList, cache: str, device: torch.device, batch_size: int,
                    num_workers: int, trust_file: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features fp16 [N, F], labels [N], reused?) of one split, extracted once. A cache file
    is reused when it lists the same images (hash of the paths and labels) and version; it is
    read weights-only (trex_fast.safe_load) and written atomically."""
    listing = _sha1(repr(images.pairs))
    if os.path.isfile(cache):
        saved = load_file(cache, trust_file)
        if saved.get("listing") == listing and saved.get("version") == CACHE_VERSION:
            return saved["features"], saved["labels"], True
    feats, labels = extract(net, images, device, batch_size, num_workers,
                            os.path.basename(cache))
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    atomic.save_torch({"features": feats, "labels": labels, "listing": listing,
                       "version": CACHE_VERSION}, cache)
    return feats, labels, False


def _cache_name(data: Labelled, entry: str, split: str, image_size: int) -> str:
    where = f"_{_sha1(os.path.abspath(entry))}" if is_path(entry) else ""  # paths can collide
    return f"{data.name}{where}_{split}_{image_size}px.pt"


def split_counts(data: Labelled) -> dict:
    """The images the probe uses: n_train (fitted in the search), n_val (the search's per-class
    validation split, drawn from train), n_test; the final refit uses n_train + n_val."""
    n_val = len(per_class_split(torch.tensor([y for _, y in data.train]))[1])
    return {"split": data.split, "n_train": len(data.train) - n_val, "n_val": n_val,
            "n_test": len(data.test)}


def log_odds_mean(results: list[dict]) -> float | None:
    """The transfer average: mean log-odds over the datasets not in NOT_IN_MEAN (None if
    there is none)."""
    kept = [r["log_odds"] for r in results if r["dataset"] not in NOT_IN_MEAN]
    return statistics.fmean(kept) if kept else None


def summarise(name: str, runs: list[dict], data: Labelled, kind: str) -> dict:
    """One dataset's result over seeds: its split and counts, top-1 mean and sample std (0 for
    one seed), the log-odds of the mean top-1, and each seed's searched hyper-parameters."""
    top1 = [r["top1"] for r in runs]
    mean = statistics.fmean(top1)
    return {"dataset": name, "probe": kind, "classes": data.num_classes, **split_counts(data),
            "train_images": len(data.train), "test_images": len(data.test),
            "top1_mean": mean, "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "top1_per_seed": top1, "log_odds": log_odds(mean),
            "per_seed": [{k: v for k, v in r.items() if k != "kind"} for r in runs]}


def run_transfer(net: torch.nn.Module, tag: str, entries: list[str], datasets: list[Labelled],
                 settings: TransferSettings, device: torch.device) -> dict:
    """Phases 2-4 for datasets already read and checked (phase 1). Returns the report dict."""
    transform = transfer_transform(settings.image_size)
    results, reused = [], []
    for entry, data in zip(entries, datasets):
        # ---- features, once per backbone, dataset and split
        splits = {}
        for split, pairs in (("train", data.train), ("test", data.test)):
            cache = os.path.join(settings.cache_dir, tag,
                                 _cache_name(data, entry, split, settings.image_size))
            feats, labels, hit = cached_features(
                net, ImageList(pairs, transform), cache, device, settings.batch_size,
                settings.num_workers, settings.trust_file)
            splits[split] = (feats.to(device).float(), labels.to(device))
            reused.append(hit)
        # ---- the searched probe, one run per seed
        kind = data.probe if settings.probe_kind == "auto" else settings.probe_kind
        runs = [probe(*splits["train"], *splits["test"], kind=kind, trials=settings.trials,
                      seed=seed, sgd_epochs=settings.sgd_epochs)
                for seed in range(settings.seeds)]
        results.append(summarise(data.name, runs, data, kind))
        print(f"[transfer] {data.name}: top-1 {results[-1]['top1_mean']:.2f} "
              f"+- {results[-1]['top1_std']:.2f} over {settings.seeds} seeds", flush=True)
    in1k = next((r["top1_mean"] for r in results if r["dataset"] in NOT_IN_MEAN), None)
    return {"eval": "transfer", "datasets": results, "log_odds_mean": log_odds_mean(results),
            "log_odds_datasets": [r["dataset"] for r in results
                                  if r["dataset"] not in NOT_IN_MEAN],
            "in1k_probe_top1": in1k,
            "features_reused": all(reused), "trials": settings.trials, "seeds": settings.seeds,
            "image_size": settings.image_size}
