"""The transfer suite as the paper reports it (RECIPE.md "Evaluation", issue #16).

Phases, in order: (1) read and check every dataset (trex_fast.eval.datasets), so that a missing
one fails before any work; (2) extract each split's frozen pre-projector features once per
backbone, cached on disk in fp16; (3) per dataset and seed, the Optuna-searched probe
(trex_fast.eval.probes); (4) per-dataset top-1 mean/std over seeds, log-odds and their mean over the
transfer datasets (IN1K apart, as in the authors' summary), written by trex_fast.eval.report.
`evaluate_transfer` is `python -m trex_fast.eval transfer`: the phases for a backbone file, the
outputs written, the report returned.
"""
from __future__ import annotations

import hashlib
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.transforms as T

from pipelines import atomic
from trex_fast import runlog
from trex_fast.availability import resolve_device
from trex_fast.cli import FlagError, check_choice, flag
from trex_fast.eval.datasets import ImageList, Labelled, is_path, resolve_all
from trex_fast.eval.features import AUTO_WORKERS, extract_features, trust_help
from trex_fast.eval.probes import SGD_EPOCHS, TRIALS, log_odds, per_class_split, probe
from trex_fast.eval.report import NOT_IN_MEAN, write_outputs
from trex_fast.models.weights import SAFETENSORS, load_backbone
from trex_fast.runlog import device_name, git_revision, library_versions
from trex_fast.safe_load import load_file

CACHE_VERSION = 1  # bump when the extraction changes: older cache files are then ignored
PROBE_KINDS = ("auto", "lbfgs", "sgd")


@dataclass(frozen=True)
class TransferSettings:
    """`python -m trex_fast.eval transfer`: its flags (run_transfer reads the probe, image and
    cache ones, so they keep defaults for callers that pass a backbone and datasets apart)."""
    backbone: str = flag("", "weights file (trex_fast checkpoint, backbone.pth, torchvision or "
                             "released)", required=True)
    datasets: tuple[str, ...] = flag(
        (), "comma-separated names (aircraft, cars, dtd, eurosat, flowers, pets, food101, "
            "sun397, inat2018, inat2019, cog_l1..cog_l5, in1k; layouts in docs/TRANSFER.md) "
            "and/or ImageFolder roots holding train/ and test/ (or val/)", required=True)
    data_root: str = flag(".", "the folder the named datasets sit in, each in its official "
                               "layout")
    arch: str = flag("resnet50", "backbone architecture: a torchvision ResNet or timm/<name> "
                                 "(trex_fast.models.registry)")
    trials: int = flag(TRIALS, "Optuna trials per dataset and seed (the paper: 30)")
    seeds: int = flag(3, "seeds averaged (validation split, sampler, SGD order); mean and std "
                         "reported")
    probe_kind: str = flag("auto", "auto (the paper's: L-BFGS for the 8 small datasets and "
                                   "ImageFolder roots, SGD for IN1K, CoG, iNat), lbfgs or sgd "
                                   "for all")
    sgd_epochs: int = flag(SGD_EPOCHS, "epochs of each SGD fit (the paper: 100)")
    image_size: int = flag(224, "Resize (bicubic) + CenterCrop side")
    output_dir: str = flag("runs/transfer", "where transfer.md/.json/.csv and trade_off.png go")
    cache_dir: str = flag("runs/transfer_cache", "features, one folder per backbone (reruns "
                                                 "reuse them)")
    compare: tuple[str, ...] = flag((), "comma-separated transfer.json files or run folders to "
                                        "draw with this model")
    in1k_top1: float | None = flag(None, "this model's IN1K top-1 for the plot (default: an in1k "
                                         "probe of this run, else metrics.jsonl next to "
                                         "--backbone)")
    label: str = flag("", "this model's name in the outputs (default: the backbone's file name)")
    batch_size: int = flag(128, "images per forward pass")
    num_workers: int = flag(AUTO_WORKERS, "data-loading workers; -1: this machine's cores")
    device: str = flag("auto", "auto, cpu or cuda (features and probes)")
    trust_file: bool = flag(False, trust_help("--backbone and the cached features"))


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
    feats, labels = extract_features(net, images, device, batch_size, num_workers,
                                     torch.float16, os.path.basename(cache))
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
                 settings: TransferSettings, device: torch.device,
                 on_dataset: Callable[[dict], None] | None = None) -> dict:
    """Phases 2-4 for datasets already read and checked (phase 1). Returns the report dict;
    `on_dataset` gets each dataset's result as soon as it is done (the CLI prints it)."""
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
        if on_dataset:
            on_dataset(results[-1])
    in1k = next((r["top1_mean"] for r in results if r["dataset"] in NOT_IN_MEAN), None)
    return {"eval": "transfer", "datasets": results, "log_odds_mean": log_odds_mean(results),
            "log_odds_datasets": [r["dataset"] for r in results
                                  if r["dataset"] not in NOT_IN_MEAN],
            "in1k_probe_top1": in1k,
            "features_reused": all(reused), "trials": settings.trials, "seeds": settings.seeds,
            "image_size": settings.image_size}


def _in1k_top1(backbone: str, report: dict) -> float | None:
    """The model's IN1K top-1 for the trade-off plot: an `in1k` probe in this run, else the
    training head's figure of the run the backbone file sits in (runlog.in1k_head_top1)."""
    if report["in1k_probe_top1"] is not None:
        return report["in1k_probe_top1"]
    return runlog.in1k_head_top1(os.path.dirname(os.path.abspath(backbone)))


@dataclass(frozen=True)
class TransferOutcome:
    report: dict  # what transfer.json holds
    paths: list  # the files written in --output_dir
    not_plotted: list  # models left off the trade-off plot for want of an IN1K top-1


def evaluate_transfer(s: TransferSettings,
                      on_dataset: Callable[[dict], None] | None = None) -> TransferOutcome:
    """The whole protocol for a backbone file: every dataset checked first, then features,
    probes and the outputs in --output_dir."""
    check_choice("probe_kind", s.probe_kind, PROBE_KINDS)
    if not s.datasets:
        raise FlagError("--datasets: give at least one dataset name or ImageFolder root")
    # ---- phase 1: every dataset read and checked before any feature is extracted
    data = resolve_all(list(s.datasets), s.data_root)
    device = resolve_device(s.device)
    net = load_backbone(s.backbone, s.arch, s.trust_file)
    # ---- phases 2-4: cached features, searched probes over seeds, outputs
    report = run_transfer(net, backbone_tag(s.backbone, s.arch), list(s.datasets), data, s,
                          device, on_dataset)
    report["label"] = s.label or os.path.basename(s.backbone)
    report["in1k_top1"] = s.in1k_top1 if s.in1k_top1 is not None else _in1k_top1(s.backbone,
                                                                                  report)
    report["env"] = {"git": git_revision(), "libraries": library_versions(),
                     "device": device_name(device), "backbone": os.path.abspath(s.backbone),
                     "arch": s.arch}
    paths, not_plotted = write_outputs(s.output_dir, report, list(s.compare))
    return TransferOutcome(report, paths, not_plotted)


def summary(report: dict) -> dict:
    """The result in one JSON object (the CLI's last line, the sweep's eval_transfer.json)."""
    return {"eval": "transfer",
            "top1": {r["dataset"]: r["top1_mean"] for r in report["datasets"]},
            "top1_std": {r["dataset"]: r["top1_std"] for r in report["datasets"]},
            "log_odds_mean": report["log_odds_mean"],
            "in1k_probe_top1": report["in1k_probe_top1"],
            "features_reused": report["features_reused"]}
