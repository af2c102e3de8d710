"""The end of a training run: both IN1K figures, each named (issue #25; RECIPE.md "Evaluation").

Which IN1K figure the paper's 78.0 / 80.2 is, the release does not say (docs/TRANSFER.md), so
a run ends with both, printed in one block and written to <output_dir>/final.json:
- `in1k_head_top1_fp32`: the training head (memory prototypes or cosine classifier) with
  autocast off, through the one val path (trex_fast.eval.in1k.evaluate) and the reference val
  transform, on the original val JPEGs when they are found (`in1k_head_source` says where),
  else on the run's own val data, read again in fp32. Every rank evaluates its shard, as at
  every epoch's end.
- `in1k_probe_top1`, with --final_probe=in1k: the transfer suite's linear probe on frozen IN1K
  features of backbone.pth (trex_fast.eval.transfer), on rank 0 while the others wait.
metrics.jsonl's per-epoch val_top1 stays as it was: the run's precision, its own val data.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import find_classes

from pipelines import atomic
from pipelines.convert.report import load_meta
from pipelines.loaders.reference import ReferenceValData
from pipelines.spec import val_resize_size
from trex_fast import distributed, runlog
from trex_fast.config import Config, ConfigError
from trex_fast.data import build_val, class_names, close_data, val_location
from trex_fast.eval.in1k import evaluate
from trex_fast.eval.transfer import TransferSettings
from trex_fast.plan import RunPlan
from trex_fast.step import TrainState

FINAL_JSON = runlog.FINAL_NAME
NO_PROBE = "not run (--final_probe=in1k runs it)"


@dataclass(frozen=True)
class FinalPlan:
    """What the end of the run reads, decided and checked before training starts."""

    val_folder: str | None  # ImageFolder of the original val JPEGs; None: the run's own val
    source: str  # final.json's in1k_head_source
    probe_root: str | None  # IN1K root (train/, val/) of --final_probe=in1k; None: no probe


def plan_final(cfg: Config, plan: RunPlan) -> FinalPlan:
    """Find the original val JPEGs (--val_images, else <data>/val, else the val/ of the
    converter's source in <data>/meta.json) and, with --final_probe=in1k, the IN1K root they
    sit in. A bad --val_images, or a probe without an IN1K root, is a ConfigError now rather
    than after training."""
    classes = class_names(plan.data_root, plan.pipeline)
    folder, source = _original_val(cfg, plan, classes)
    if cfg.final_probe == "off":
        return FinalPlan(folder, source, None)
    if folder is None:
        raise ConfigError(f"--final_probe={cfg.final_probe}: it reads the original IN1K train/ "
                          f"and val/, and no original val folder was found ({source}); give "
                          "--val_images=<IN1K root>/val with train/ next to it")
    root = os.path.dirname(folder)
    problem = _mismatch(os.path.join(root, "train"), classes)
    if problem:
        raise ConfigError(f"--final_probe={cfg.final_probe}: it reads the original IN1K train/ "
                          f"next to {folder}, and {os.path.join(root, 'train')}: {problem}")
    return FinalPlan(folder, source, root)


def _original_val(cfg: Config, plan: RunPlan, classes: list[str]) -> tuple[str | None, str]:
    if cfg.val_images:
        folder = os.path.abspath(os.path.expanduser(cfg.val_images))
        problem = _mismatch(folder, classes)
        if problem:
            raise ConfigError(f"--val_images={cfg.val_images!r}: {problem}; expected an "
                              "ImageFolder of the run's classes (<wnid>/*.JPEG)")
        return folder, f"original val JPEGs at {folder} (--val_images)"
    tried = []
    for folder, name in _candidates(plan):
        problem = _mismatch(folder, classes)
        if problem is None:
            return folder, f"original val JPEGs at {folder} ({name})"
        tried.append(f"{name} {folder}: {problem}")
    return None, (f"the run's own val data, {plan.pipeline} at {val_location(plan)}, read again "
                  f"in fp32; no original val JPEGs found ({'; '.join(tried)})")


def _candidates(plan: RunPlan) -> list[tuple[str, str]]:
    """(folder, how it was found) in the order they are tried."""
    found = [(os.path.join(plan.data_root, "val"), "<data>/val")]
    if os.path.isfile(os.path.join(plan.data_root, "meta.json")):
        src = load_meta(Path(plan.data_root)).get("options", {}).get("src")
        if src:
            found.append((os.path.join(src, "val"), "the converter's source, meta.json"))
    return [(os.path.abspath(folder), name) for folder, name in found]


def _mismatch(folder: str, classes: list[str]) -> str | None:
    """Why `folder` is not an ImageFolder of exactly these classes; None when it is."""
    if not os.path.isdir(folder):
        return "no such directory"
    try:
        names = find_classes(folder)[0]
    except FileNotFoundError:
        return "no class folders in it"
    if names != list(classes):
        extra = sorted(set(names) - set(classes))[:3]
        missing = sorted(set(classes) - set(names))[:3]
        return (f"its {len(names)} class folders are not the run's {len(classes)} classes "
                f"(not in the run: {extra}; missing: {missing})")
    return None


# ---------------------------------------------------------------------------------------------
# the figures
# ---------------------------------------------------------------------------------------------
def head_figure(cfg: Config, plan: RunPlan, state: TrainState, fin: FinalPlan,
                val_data) -> dict:
    """The training head's top-1/top-5 in fp32 (every rank, on its shard)."""
    data = _fp32_val(cfg, plan, fin, val_data)
    try:
        result = evaluate(state, data, fp32=True)
    finally:
        if data is not val_data:
            close_data(data)
    size = cfg.global_size
    return {runlog.HEAD_TOP1_FP32: result[runlog.VAL_TOP1],
            "in1k_head_top5_fp32": result[runlog.VAL_TOP5],
            "in1k_head_images": int(result[runlog.VAL_IMAGES]), "in1k_head_source": fin.source,
            "in1k_head_on_original_val": fin.val_folder is not None,
            "in1k_head_transform": f"Resize({val_resize_size(size)}) + CenterCrop({size})"}


def _fp32_val(cfg: Config, plan: RunPlan, fin: FinalPlan, val_data):
    """The val images of FinalPlan as fp32 batches: the run's own loader where it already reads
    them so (the reference pipeline in fp32), else a loader made for this one pass."""
    reads_them = plan.pipeline == "reference" and plan.precision == "fp32"
    if reads_them and fin.val_folder == os.path.abspath(val_location(plan)):
        return val_data
    settings = dataclasses.replace(plan.loader_settings(), dtype=torch.float32)
    if fin.val_folder is not None:
        return ReferenceValData(fin.val_folder, cfg.global_size, settings)
    return build_val(cfg, plan, settings)


def probe_figure(cfg: Config, plan: RunPlan, root: str, backbone: str,
                 settings: TransferSettings) -> dict:
    """The transfer suite's IN1K probe (its dataset reader, probe and settings) on backbone."""
    from trex_fast.eval.datasets import in1k_at
    from trex_fast.eval.transfer import backbone_tag, run_transfer
    from trex_fast.models.weights import load_backbone

    data = in1k_at(root)
    net = load_backbone(backbone, cfg.arch)
    report = run_transfer(net, backbone_tag(backbone, cfg.arch), ["in1k"], [data], settings,
                          plan.torch_device)
    result = report["datasets"][0]
    return {"in1k_probe_top1": result["top1_mean"], "in1k_probe_top1_std": result["top1_std"],
            "in1k_probe": {"root": root, "backbone": backbone, "probe": result["probe"],
                           "trials": settings.trials, "seeds": settings.seeds,
                           "sgd_epochs": settings.sgd_epochs,
                           "transform": f"Resize({settings.image_size}, bicubic) + "
                                        f"CenterCrop({settings.image_size})",
                           **{k: result[k] for k in ("n_train", "n_val", "n_test")}}}


def probe_settings(plan: RunPlan) -> TransferSettings:
    """The paper's protocol (TransferSettings' defaults); features cached in the run's folder."""
    return TransferSettings(num_workers=plan.workers,
                            cache_dir=os.path.join(plan.output_dir, "final_probe_features"))


def final_figures(cfg: Config, plan: RunPlan, state: TrainState, fin: FinalPlan, val_data,
                  backbone: str, last: dict, settings: TransferSettings | None = None) -> dict:
    """Both IN1K figures; every rank calls this, rank 0 prints them and writes final.json."""
    record = {"epoch": last["epoch"], "step": state.step,
              **head_figure(cfg, plan, state, fin, val_data),
              "in1k_probe_top1": None, "in1k_probe": NO_PROBE}
    if fin.probe_root is not None:
        settings = settings or probe_settings(plan)
        record.update(distributed.main_then_all(
            lambda: probe_figure(cfg, plan, fin.probe_root, backbone, settings)) or {})
    record.update(val_top1_last_epoch=last.get(runlog.VAL_TOP1), val_precision=plan.precision)
    if plan.is_main:
        atomic.write_json(os.path.join(plan.output_dir, FINAL_JSON), record)
    return record


def report_lines(record: dict) -> list[str]:
    """The end-of-run block: which IN1K figure is which (docs/TRANSFER.md)."""
    lines = [f"IN1K at the end of the run (epoch {record['epoch']}, step {record['step']}):",
             f"  training head, fp32 (in1k_head_top1_fp32): top-1 "
             f"{record['in1k_head_top1_fp32']:.2f}%, top-5 {record['in1k_head_top5_fp32']:.2f}% "
             f"on {record['in1k_head_images']} images, {record['in1k_head_transform']}, "
             f"{record['in1k_head_source']}"]
    if record["in1k_probe_top1"] is None:
        lines.append(f"  linear probe (in1k_probe_top1): {NO_PROBE}")
    else:
        probe = record["in1k_probe"]
        lines.append(f"  linear probe (in1k_probe_top1): top-1 {record['in1k_probe_top1']:.2f}% "
                     f"+- {record['in1k_probe_top1_std']:.2f} over {probe['seeds']} seeds "
                     f"({probe['probe']}, {probe['trials']} trials, frozen backbone features)")
    if record["val_top1_last_epoch"] is not None:
        lines.append(f"  per-epoch val_top1 ({record['val_precision']}, the run's own val data, "
                     f"metrics.jsonl): {record['val_top1_last_epoch']:.2f}%")
    lines.append(f"  written to {FINAL_JSON}")
    return lines
