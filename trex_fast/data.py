"""The loaders of the pipeline the run plan names (trex_fast.plan decides which).

`--data` is an ImageFolder root (train/ and val/), a directory converted by
tools/convert_in1k.py (train.beton, dali/), or empty for the built-in demo dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.datasets.folder import find_classes

from pipelines import demo_data
from pipelines.batch import LoaderSettings
from pipelines.convert.report import load_meta
from pipelines.errors import BadFileError
from pipelines.loaders.reference import ReferenceTrainData, ReferenceValData
from pipelines.spec import multicrop_spec
from trex_fast import distributed, runlog
from trex_fast.config import Config


def resolve_data_root(cfg: Config) -> str:
    if not cfg.data:
        return demo_data.ensure_demo_dataset()
    root = os.path.expanduser(cfg.data)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data={cfg.data!r}: no such directory")
    return root


def _check_imagefolder(root: str) -> None:
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(
                f"--data={root!r} has no {split}/ folder: the reference pipeline reads an "
                "ImageFolder root with train/<class>/*.JPEG and val/<class>/*.JPEG")


def class_names(root: str, pipeline: str) -> list[str]:
    """The run's classes in label order, the one home of this fact (issue #15): the converter's
    class list in <root>/meta.json for converted data (ffcv, dali), the train/ class folders
    otherwise (as ImageFolder lists them). Labels are indexes into this list."""
    if pipeline == "reference":
        _check_imagefolder(root)
        return find_classes(os.path.join(root, "train"))[0]
    if not os.path.isfile(os.path.join(root, "meta.json")):
        raise FileNotFoundError(f"--data={root!r} has no meta.json: --pipeline={pipeline} reads "
                                "data converted by tools/convert_in1k.py, which writes it last")
    classes = load_meta(Path(root)).get("classes")
    if not classes:
        raise BadFileError(f"{os.path.join(root, 'meta.json')}: lists no classes; rerun "
                           "tools/convert_in1k.py")
    return list(classes)


def count_classes(root: str, pipeline: str) -> int:
    return len(class_names(root, pipeline))


def build_data(cfg: Config, plan):
    """(train data, val data) as the plan (trex_fast.plan) says: train yields a
    MultiCropBatch per step via .epoch(epoch, start)."""
    root, pipeline, settings = plan.data_root, plan.pipeline, plan.loader_settings()
    if pipeline == "ffcv":
        from trex_fast import availability

        availability.require("ffcv", availability.has_ffcv(), "ffcv")
        from pipelines.loaders.ffcv_multicrop import FfcvTrainData  # imports ffcv

        train = FfcvTrainData(os.path.join(root, "train.beton"), multicrop_spec(cfg), settings,
                              decode=plan.decode)
        return train, build_val(cfg, plan, settings)
    if pipeline == "dali":
        from trex_fast import availability

        availability.require("nvidia-dali", availability.has_dali(), "dali")
        from pipelines.loaders.dali_multicrop import DaliTrainData  # imports nvidia.dali

        train = DaliTrainData(os.path.join(root, "dali", "train"), multicrop_spec(cfg), settings)
        return train, build_val(cfg, plan, settings)
    if pipeline != "reference":
        raise NotImplementedError(f"--pipeline={pipeline!r}: accepted values are auto, "
                                  "reference, ffcv, dali")
    _check_imagefolder(root)
    train = ReferenceTrainData(os.path.join(root, "train"), multicrop_spec(cfg), settings)
    return train, build_val(cfg, plan, settings)


def val_location(plan) -> str:
    """Where the run's own val split is stored (its pipeline's format)."""
    return os.path.join(plan.data_root, {"ffcv": "val.beton", "dali": os.path.join("dali", "val"),
                                         "reference": "val"}[plan.pipeline])


def build_val(cfg: Config, plan, settings: LoaderSettings):
    """The run's own val data, read by its pipeline with `settings` (the end of the run reads
    it again in fp32: trex_fast.eval.final)."""
    where = val_location(plan)
    if plan.pipeline == "ffcv":
        from pipelines.loaders.ffcv_multicrop import FfcvValData  # imports ffcv

        return FfcvValData(where, cfg.global_size, settings, decode=plan.decode)
    if plan.pipeline == "dali":
        from pipelines.loaders.dali_multicrop import DaliValData  # imports nvidia.dali

        return DaliValData(where, cfg.global_size, settings)
    return ReferenceValData(where, cfg.global_size, settings)


def close_data(*datas) -> None:
    """End the loaders' worker processes now (the reference pipeline's; FFCV and DALI load in
    threads): a run that ends, however it ends, leaves none behind (issue #26)."""
    for data in datas:
        close = getattr(data, "close", None)
        if close is not None:
            close()


def epoch_data_counts(train_data, device: torch.device) -> dict:
    """What the train pipeline counted this epoch, summed over ranks, for the epoch's metrics:
    {"corrupt_images": n} where it replaces images that fail to decode (FFCV, decode="cpu"),
    nothing for pipelines that stop on such an image instead. Read once at the epoch's end
    (one collective under DDP), never per batch."""
    count = getattr(train_data, "corrupt_images", None)
    if count is None:
        return {}
    total = distributed.all_reduce_sum(torch.tensor([int(count)], device=device))
    return {runlog.CORRUPT_IMAGES: int(total.item())}  # .item(): the epoch's end, not per batch
